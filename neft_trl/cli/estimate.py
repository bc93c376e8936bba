"""``neft-trl estimate``: NeFT's memory against LoRA's at equal parameters, from a model's config alone."""

from __future__ import annotations

import argparse

from .common import LOADING_ERRORS, CLIError, one_line


def add_arguments(estimate: argparse.ArgumentParser) -> None:
    estimate.add_argument("model", metavar="MODEL", help="Model folder (or hub id, online) holding config.json.")
    budget = estimate.add_mutually_exclusive_group()
    budget.add_argument("--param_ratio", type=float, default=None, help="Share of all parameters (default 0.06).")
    budget.add_argument("--neuron_ratio", type=float, default=None, help="Share of the candidate neurons.")
    budget.add_argument("--num_neurons", type=int, default=None, help="Number of candidate neurons.")
    estimate.add_argument("--selector", default="cosine", help="cosine, activation, gradient, random, ...")
    estimate.add_argument("--probe", choices=("sketch", "full"), default="sketch", help="The cosine probe.")
    estimate.add_argument("--neft_mode", choices=("auto", "hooks", "delta"), default="auto")
    estimate.add_argument("--include_gate", action="store_true", help="gate_proj rows are candidates too.")
    estimate.add_argument("--neuron_targets", default="mlp",
                          help="Candidates: 'mlp' (default) or 'mlp,attention' (q/k/v rows and o columns too).")
    estimate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    estimate.add_argument("--tokens", type=int, default=2048, help="Tokens per batch for the activation figure.")


def estimate_command(args: argparse.Namespace) -> None:
    import torch

    from ..budget import Budget
    from ..estimate import activation_bytes, estimate_lora, estimate_neft, format_table
    from ..loading import model_skeleton
    from ..neurons import build_neuron_map

    try:
        budget = Budget.resolve(args.param_ratio, args.neuron_ratio, args.num_neurons)
        model = model_skeleton(args.model, dtype=getattr(torch, args.dtype))  # shapes only: no weight is read
        neuron_map = build_neuron_map(model, include_gate=args.include_gate, targets=args.neuron_targets)
        mode = "delta" if args.neft_mode == "auto" else args.neft_mode
        neft = estimate_neft(model, neuron_map, budget, args.selector, mode, args.probe)
    except (*LOADING_ERRORS, ValueError) as err:  # a bad folder or model: the files are the input here
        raise CLIError(one_line(err)) from err
    lora = estimate_lora(model, neft.trainable_parameters)
    print(f"{args.model}: {args.selector} selector ({args.probe} probe), neft_mode={mode}, {args.dtype}, {budget}")
    print(format_table(neft, lora, activation_bytes(model, args.tokens, torch.finfo(getattr(torch, args.dtype)).bits
                                                    // 8)))
