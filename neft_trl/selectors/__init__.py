"""Built-in neuron selectors. Each module is a plugin registered through the ``neft_trl.selectors`` entry points."""

from .base import NeuronSelector, SelectionContext

__all__ = ["NeuronSelector", "SelectionContext"]
