"""QNeFT: a 4-bit base model (bitsandbytes NF4) with trainable full-precision neuron deltas.

    python examples/qneft_4bit.py --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --output_dir qneft
    python examples/qneft_4bit.py --max_steps 50 --selector gradient     # offline SmolLM2 + Django pairs

The base weights stay packed in 4 bits and frozen; each selected neuron gets a small fp32 delta (``neft_mode
="delta"``, which ``auto`` picks for quantized models). The run saves only the deltas
(``neft_delta.safetensors``) and the mask; ``merge_neuron_delta`` folds them into a full-precision copy of the
base model. Same flags as ``sft_neft.py`` (every ``NeFTConfig`` field), plus the 4-bit options below.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from sft_neft import ScriptArguments, load_data
from transformers import BitsAndBytesConfig, HfArgumentParser

from neft_trl import NeFTConfig, NeFTSFTTrainer
from neft_trl.demo.models import resolve_model
from neft_trl.loading import load_model


@dataclass
class QuantizationArguments:
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 or fp4."})
    bnb_4bit_compute_dtype: str = field(
        default="float32", metadata={"help": "Compute dtype of the 4-bit layers: float32 (CPU), bfloat16 (GPU)."}
    )


def main(argv: list[str] | None = None) -> NeFTSFTTrainer:
    parser = HfArgumentParser((ScriptArguments, QuantizationArguments, NeFTConfig))
    script_args, quant_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.neft_mode == "hooks":
        parser.error("--neft_mode hooks cannot train 4-bit weights: use delta (or auto, the default).")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_args.bnb_4bit_quant_type,
                             bnb_4bit_compute_dtype=getattr(torch, quant_args.bnb_4bit_compute_dtype))
    model = load_model(resolve_model(script_args.model_name_or_path), dtype=torch.float32, quantization_config=bnb)
    train_dataset, eval_dataset = load_data(script_args)
    trainer = NeFTSFTTrainer(model, train_dataset, eval_dataset=eval_dataset, args=training_args)
    trainer.train()
    if eval_dataset is not None:
        print(trainer.evaluate())
    trainer.save_model(training_args.output_dir)  # deltas + mask, not the 4-bit base
    print(f"{trainer.neft_mode} mode: {trainer.neuron_mask} -> {training_args.output_dir}")
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
