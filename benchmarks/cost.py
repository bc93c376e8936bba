"""Cost at scale: peak memory of selection and of training, and step time, NeFT vs LoRA vs full fine-tuning.

    python benchmarks/cost.py                                     # TinyLlama-1.1B shape, every method, 3 steps
    python benchmarks/cost.py --shape smollm2-135m --methods lora,neft-delta-cosine

Memory and step time do not depend on weight values, so a randomly initialised model of a real shape measures what
the real model would cost without downloading it. Each method runs in its own process (peak RSS is per process), on
the same batch (1 x 128 tokens by default), in fp32 on the CPU; the high-water mark is reset between selection and
training (``/proc/self/clear_refs``, read back from ``VmHWM``), after freed heap is handed back to the system
(``malloc_trim``). NeFT runs through the functional API with its defaults (``select_neurons`` + ``apply_neurons``),
the same calls the trainer makes; LoRA is PEFT on all linear layers at the rank with NeFT's trainable parameter
count. The table prints each phase's peak and the step time as ratios to LoRA, with the memory estimate
(``neft_trl.estimate``) beside.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time

import torch

SHAPES = {  # Llama configs: hidden, intermediate, layers, heads, kv heads; SmolLM2's vocabulary, tied embeddings
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3),
}
METHODS = ("lora", "full", "neft-delta-cosine", "neft-hooks-cosine", "neft-delta-cosine_full", "neft-delta-gradient",
           "neft-delta-activation", "neft-delta-random")


def high_water_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def reset_high_water() -> None:
    """Start a new phase's high-water mark at the memory the process really holds now.

    Freed heap that glibc keeps mapped (model construction's temporaries, selection's buffers) would otherwise
    count towards the next phase's peak, by an amount that varies run to run (0.4 GiB at 135M); ``malloc_trim``
    hands it back first, so each phase's peak is what that phase needs."""
    gc.collect()  # what only reference cycles hold is freed first
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_one(method: str, shape: str, steps: int, tokens: int, param_ratio: float) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from neft_trl import apply_neurons, build_neuron_map, select_neurons
    from neft_trl.budget import Budget
    from neft_trl.estimate import estimate_lora, estimate_neft, lora_rank_for
    from neft_trl.layers import parameter_count

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, **SHAPES[shape])
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    budget = Budget.resolve(param_ratio=param_ratio)
    neft = estimate_neft(model, build_neuron_map(model), budget, "cosine", "delta")
    record = {"method": method, "model_mib": high_water_mib()}
    reset_high_water()
    start = time.perf_counter()
    if method.startswith("neft-"):
        _, mode, selector = method.split("-", 2)
        kwargs = {"probe": "full"} if selector == "cosine_full" else {}
        mask = select_neurons(model, [batch] * 3, selector.split("_")[0], param_ratio=param_ratio,
                              show_progress=False, **kwargs)
        record["trainable_parameters"] = mask.trainable_parameters
        record["estimate_mib"] = estimate_neft(model, build_neuron_map(model), budget, selector.split("_")[0], mode,
                                               kwargs.get("probe", "sketch")).peak / 2**20
        optimizer = apply_neurons(model, mask, mode).make_optimizer(torch.optim.AdamW, lr=1e-4)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        rank = lora_rank_for(model, neft.trainable_parameters)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear"))
        record["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        record["estimate_mib"] = estimate_lora(model, neft.trainable_parameters).peak / 2**20
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    else:
        record["trainable_parameters"] = parameter_count(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    record["selection_s"] = time.perf_counter() - start
    record["selection_mib"] = high_water_mib()
    reset_high_water()
    model.train()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    record["training_mib"] = high_water_mib()
    record["step_s"] = statistics.median(seconds[1:] or seconds)
    return record


def table(records: list[dict]) -> str:
    lora = next((r for r in records if r["method"] == "lora"), None)
    lines = ["| method | trainable | selection peak | training peak | peak / LoRA | step | step / LoRA | estimate |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        peak = max(r["selection_mib"], r["training_mib"])
        ratio = f"{peak / max(lora['selection_mib'], lora['training_mib']):.2f}x" if lora else "-"
        step = f"{r['step_s'] / lora['step_s']:.2f}x" if lora else "-"
        estimate = f"{r['estimate_mib'] / 1024:.2f} GiB" if "estimate_mib" in r else "-"
        lines.append(f"| {r['method']} | {r['trainable_parameters']:,} | {r['selection_mib'] / 1024:.2f} GiB | "
                     f"{r['training_mib'] / 1024:.2f} GiB | {ratio} | {r['step_s']:.2f} s | {step} | {estimate} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--param_ratio", type=float, default=0.06)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one method in this process, print its JSON
    parser.add_argument("--out", help="also write the records as JSON here")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.shape, args.steps, args.tokens, args.param_ratio)))
        return []
    records = []
    for method in args.methods.split(","):
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        cmd = [sys.executable, __file__, "--one", method, "--shape", args.shape, "--steps", str(args.steps),
               "--tokens", str(args.tokens), "--param_ratio", str(args.param_ratio)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{method}: failed (exit {done.returncode}):\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(records[-1]), flush=True)
    print(f"\n{args.shape}, fp32, batch 1 x {args.tokens}, {args.steps} steps, budget {args.param_ratio}\n")
    print(table(records))
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(records, indent=2))
    return records


if __name__ == "__main__":
    main()
