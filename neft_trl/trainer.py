"""``NeFTSFTTrainer``: TRL's ``SFTTrainer`` that selects neurons, then trains only those.

The flow is one way: select (a selector plugin scores neurons) -> mask (``NeuronMask``) -> training mode
(gradient hooks or neuron deltas) -> save. Selection runs once, inside ``create_optimizer`` (before the
optimizer exists, so it only ever sees the selected parameters), from ``args.seed``, without changing any
RNG the run draws from. No selection or layer logic lives here.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTTrainer

from .compat import (
    activation_checkpointing_on,
    frozen_during_trl_init,
    load_model_like_trl,
    quantized_training_allowed,
)
from .config import NeFTConfig
from .distributed import broadcast_mask, check_launch, check_sharded_setup
from .errors import MissingFileError
from .estimate import log_estimate
from .functional import apply_neurons
from .layers import parameter_count
from .mask import MASK_FILENAME, NeuronMask
from .neurons import NeuronMap, build_neuron_map
from .plugins import get_selector
from .report import NeuronReport, neuron_report
from .selection import log_mask, run_selector
from .selectors.base import SelectionContext
from .training import NeuronTraining, resolve_mode
from .training.optimizers import check_hooks_optimizer

logger = logging.getLogger("neft_trl")


class NeFTSFTTrainer(SFTTrainer):
    """Supervised fine-tuning of a few selected MLP neurons (NeFT, Xu et al., COLING 2025).

    Args:
        model: a model or a model id/path, as for ``SFTTrainer``.
        train_dataset: the training data, as for ``SFTTrainer``.
        selector: neuron selector name; overrides ``args.selector``.
        args: a ``NeFTConfig``; a plain ``SFTConfig``/``TrainingArguments`` gets NeFT's defaults.
        **kwargs: every other ``SFTTrainer`` argument (eval_dataset, processing_class, callbacks, ...).

    After training starts, ``trainer.neuron_mask`` holds the selection; ``save_model`` writes a normal HF
    checkpoint plus ``neuron_mask.safetensors``.
    """

    def __init__(
        self,
        model: Any,
        train_dataset: Any = None,
        *,
        selector: str | None = None,
        args: TrainingArguments | None = None,
        neuron_mask: NeuronMask | None = None,
        **kwargs: Any,
    ):
        if isinstance(train_dataset, (TrainingArguments, dict, str)):
            raise TypeError(
                f"NeFTSFTTrainer's second positional argument is train_dataset, got a {type(train_dataset).__name__}. "
                "Pass the config by keyword: NeFTSFTTrainer(model, train_dataset, args=NeFTConfig(...))."
            )
        if kwargs.get("peft_config") is not None:
            raise ValueError("NeFTSFTTrainer trains neurons instead of a PEFT adapter: remove peft_config.")
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise ValueError(
                "NeFTSFTTrainer builds its optimizer over the selected neurons only: instead of optimizers=(...), "
                "set args.optim / learning_rate / weight_decay, or pass optimizer_cls_and_kwargs."
            )
        args = _neft_args(args, model)
        if selector is not None and selector != args.selector:
            args = copy.copy(args)  # the caller's config may serve other trainers: never change it
            args.selector = selector
        get_selector(args.selector)  # an unknown selector fails here, listing the installed ones
        model_init_kwargs = args.model_init_kwargs
        if isinstance(model, str):  # load it here, so a quantized model is frozen before TRL's bf16 cast
            model, kwargs["processing_class"] = load_model_like_trl(
                model, args, kwargs.pop("quantization_config", None), kwargs.get("processing_class")
            )
            args.model_init_kwargs = None  # consumed above; TRL would warn that it ignores them
        try:  # a quantized model trains through neuron deltas: see compat.py for both bypasses
            with quantized_training_allowed(model), frozen_during_trl_init(model):
                super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        finally:
            args.model_init_kwargs = model_init_kwargs
        self.neuron_map: NeuronMap = build_neuron_map(
            self.model, args.neuron_unit, args.include_gate, args.neuron_modules, args.targets, args.attention_modules
        )
        self.neft_mode = resolve_mode(args.neft_mode, self.neuron_map)
        check_hooks_optimizer(self.neft_mode, args.optim, self.optimizer_cls_and_kwargs)
        check_launch(self.accelerator)
        check_sharded_setup(self, self.neft_mode)
        self.model_parameter_count = parameter_count(self.model)  # before a training mode adds any deltas
        self.memory_estimate = log_estimate(self.model, self.neuron_map, args.budget, args.selector, self.neft_mode,
                                            args.selector_kwargs)
        self.neuron_mask: NeuronMask | None = neuron_mask
        self.neuron_training: NeuronTraining | None = None
        self._resume_checkpoint: str | None = None
        self.add_callback(_NeuronStatsCallback(self))

    # -- selection -----------------------------------------------------------------------------------
    def select_neurons(self) -> NeuronMask:
        """Run the configured selector now and return its mask (does not attach it)."""
        context = SelectionContext(
            model=self.model,
            neuron_map=self.neuron_map,
            budget=self.args.budget,
            seed=self.args.seed,
            batches=self._selection_batches if self.train_dataset is not None else None,
            compute_loss=lambda model, batch: self.compute_loss(model, batch),
            trainer=self,
            show_progress=not self.args.disable_tqdm,
            total_parameters=self.model_parameter_count,
        )
        # select_neurons restores the model's mode and every RNG; TRL's metric accumulators are the trainer's to keep
        saved_metrics = copy.deepcopy(getattr(self, "_metrics", None))
        saved_tokens = getattr(self, "_total_train_tokens", None)
        mask = run_selector(context, self.args.selector, self.args.selector_kwargs, self.args.neuron_scope,
                            self.args.protect_ratio)
        if saved_metrics is not None:
            self._metrics = saved_metrics
        if saved_tokens is not None:
            self._total_train_tokens = saved_tokens
        return mask

    def neuron_report(self, *other_masks: NeuronMask, names: list[str] | None = None) -> NeuronReport:
        """Counts of this run's mask (per layer and role, trainable share of the model) and, given other masks,
        their overlap and Jaccard matrices: the numbers ``neft-trl report`` prints (``neft_trl.report``)."""
        if self.neuron_mask is None:
            raise ValueError(
                "No neuron mask yet: call train() first, or set trainer.neuron_mask = trainer.select_neurons()."
            )
        return neuron_report(self.neuron_mask, other_masks, names, total_parameters=self.model_parameter_count)

    def _selection_batches(self, count: int) -> Iterator[dict[str, torch.Tensor]]:
        """``count`` batches from the trainer's own train dataloader, cycling over it if it is shorter."""
        dataloader = self.get_train_dataloader()
        produced = 0
        try:
            while produced < count:
                before = produced
                for batch in itertools.islice(dataloader, count - produced):
                    produced += 1
                    yield self._prepare_inputs(batch)
                if produced == before:  # an empty dataloader
                    return
        finally:
            # stopping early leaves accelerate's dataloader registered as active in its GradientState
            getattr(dataloader, "end", lambda: None)()

    def _resolve_mask(self) -> NeuronMask:
        """The mask to train: one already set, the resumed checkpoint's, ``neuron_mask_path``, or a new selection.

        Resuming never selects anew: the checkpoint's weights were trained with some mask, and a selection on
        trained weights picks other neurons (and an optimizer state of another size fails to load).
        """
        if self.neuron_mask is not None:
            return self.neuron_mask
        for source in (self._resume_checkpoint, self.args.neuron_mask_path):
            if source and (os.path.isfile(source) or os.path.isfile(os.path.join(source, MASK_FILENAME))):
                mask = NeuronMask.load(source)
                log_mask(mask)
                return mask
            if source and source == self.args.neuron_mask_path:
                raise MissingFileError(f"neuron_mask_path={source!r} holds no {MASK_FILENAME}.")
        if self._resume_checkpoint:
            raise MissingFileError(
                f"Cannot resume from {self._resume_checkpoint!r}: it holds no {MASK_FILENAME}, so the neurons its "
                "weights and optimizer state belong to are unknown, and selecting anew on trained weights would "
                "pick others. A NeFT checkpoint whose save was interrupted: pass the run's mask as "
                "neuron_mask_path=... (from its output_dir or another checkpoint). A plain SFTTrainer checkpoint "
                "(its optimizer state covers every weight) cannot be resumed as NeFT: start a new run from its "
                "weights (the checkpoint folder as the model) without resume_from_checkpoint."
            )
        return self.select_neurons()  # on every rank: see distributed.py for why

    def _prepare_neurons(self) -> None:
        mask = broadcast_mask(self._resolve_mask(), self.neuron_map, self.accelerator)  # rank 0's, on every rank
        self.neuron_mask = mask
        self.neuron_training = apply_neurons(self.model, mask, self.neft_mode, neuron_map=self.neuron_map)
        if activation_checkpointing_on(self.args) and hasattr(self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph

    # -- Trainer overrides ----------------------------------------------------------------------------
    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """Select and attach the neurons first, so the optimizer only ever holds trainable neurons."""
        if self.neuron_training is None:
            self._prepare_neurons()
        had_optimizer = self.optimizer is not None
        optimizer = super().create_optimizer(*args, **kwargs)
        if not had_optimizer:
            self.neuron_training.install_weight_decay(self.optimizer, self.args.weight_decay)
        return optimizer

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        names = super().get_decay_parameter_names(model)
        excluded = self.neuron_training.no_decay_parameter_names() if self.neuron_training else set()
        return [n for n in names if n not in excluded]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._resume_checkpoint = resume_from_checkpoint or None
        if self.is_fsdp_enabled and self.neuron_training is None:  # FSDP2 must find the deltas when it wraps
            self._move_model_to_device(self.model, self.args.device)  # selection runs on the whole, unwrapped model
            self._prepare_neurons()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Delta mode: a checkpoint holds neuron deltas, not model weights, so attach the deltas and load them.

        ``train()`` calls this before creating the optimizer; the deltas are attached here (with the
        checkpoint's mask), so ``create_optimizer`` then finds them and the optimizer state loads onto them.
        """
        if self.neft_mode != "delta":
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.neuron_training is None:
            self._prepare_neurons()
        self.neuron_training.load(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.neft_mode != "delta":
            return super()._load_best_model()
        logger.info("NeFT: loading the best neuron deltas from %s", self.state.best_model_checkpoint)
        self.neuron_training.load(self.state.best_model_checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as ``SFTTrainer`` does, plus the neuron mask; delta mode saves its deltas instead of the model.

        The mask is written first, so a folder with trained weights always holds the mask they belong to.
        A delta run's own ``save_model()`` call in full precision also writes a plain merged HF checkpoint
        (``from_pretrained`` loads it) beside the compact delta file; its periodic checkpoints hold the
        deltas only, which is all a resume needs.
        """
        output_dir = output_dir or self.args.output_dir
        training = self.neuron_training
        if self.neuron_mask is not None and self.args.should_save:
            self.neuron_mask.save(os.path.join(output_dir, MASK_FILENAME))
        if training is None or not training.saves_model_itself:
            super().save_model(output_dir, _internal_call)
            return
        training.save_trained(output_dir, write=self.args.should_save)  # every rank: FSDP2 gathers the deltas
        if not self.args.should_save:
            return
        if not _internal_call and training.sharded:
            logger.warning("NeFT: under FSDP2 the saved model is the neuron delta only; neft_trl.merge_neuron_delta("
                           "base_model, %s) makes a plain checkpoint.", output_dir)
        elif not _internal_call and not training.quantized:
            training.save_merged(output_dir)
        if self.processing_class is not None:  # as SFTTrainer saves it beside the model
            self.processing_class.save_pretrained(output_dir)


class _NeuronStatsCallback(TrainerCallback):
    """Reports the selection to the Trainer's loggers (console, TensorBoard, W&B) when training starts."""

    def __init__(self, trainer: NeFTSFTTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        mask = self.trainer.neuron_mask
        if mask is None:
            return
        stats = self.trainer.neuron_report().scalars("neft/")  # totals, shares, per-layer and per-role counts
        if "selection_seconds" in mask.metadata:
            stats["neft/selection_seconds"] = float(mask.metadata["selection_seconds"])
        logger.info("NeFT: training %s", mask)
        self.trainer.log(stats)


def _neft_args(args: TrainingArguments | None, model: Any) -> NeFTConfig:
    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
        return NeFTConfig(output_dir=f"{os.path.basename(str(name).rstrip('/')) or 'model'}-NeFT")
    if isinstance(args, NeFTConfig):
        return args
    if isinstance(args, TrainingArguments):
        return NeFTConfig.from_training_args(args)
    raise TypeError(f"args must be a NeFTConfig, SFTConfig or TrainingArguments, got {type(args).__name__}.")
