"""neft-trl: Neuron-Level Fine-Tuning (NeFT; Xu et al., "Let's Focus on Neuron", COLING 2025) for TRL."""

from .budget import Budget
from .config import NeFTConfig
from .functional import apply_neurons, select_neurons
from .mask import NeuronMask
from .neurons import NeuronMap, build_neuron_map
from .plugins import available_selectors, get_selector, hookimpl, register_plugin
from .selectors.base import NeuronSelector, SelectionContext
from .trainer import NeFTSFTTrainer
from .training.delta_io import load_neuron_delta, merge_neuron_delta
from .training.peft_export import export_peft_adapter

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "NeFTConfig",
    "NeFTSFTTrainer",
    "NeuronMap",
    "NeuronMask",
    "NeuronSelector",
    "SelectionContext",
    "apply_neurons",
    "available_selectors",
    "build_neuron_map",
    "export_peft_adapter",
    "get_selector",
    "hookimpl",
    "load_neuron_delta",
    "merge_neuron_delta",
    "register_plugin",
    "select_neurons",
]
