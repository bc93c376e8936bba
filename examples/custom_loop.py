"""NeFT in your own training loop (plain PyTorch + accelerate), no Trainer: select, apply, train, save.

    python examples/custom_loop.py                        # offline: SmolLM2-135M-Instruct + Django En->De pairs
    python examples/custom_loop.py --model PATH --steps 20 --mode hooks --out neft_loop
"""

import argparse

import torch
from accelerate import Accelerator

from neft_trl import apply_neurons, select_neurons
from neft_trl.demo.data import django_pairs, translation_prompt
from neft_trl.demo.models import load_model_and_tokenizer


def batches(tokenizer, pairs, batch_size):
    """Prompt + completion token batches; the loss covers the completion only (labels -100 elsewhere)."""
    for start in range(0, len(pairs) - batch_size + 1, batch_size):
        chunk = pairs[start:start + batch_size]
        prompts = [translation_prompt(p.source, "German") + " " for p in chunk]
        enc = tokenizer([q + p.target for q, p in zip(prompts, chunk, strict=True)], return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        for row, prompt in enumerate(prompts):
            labels[row, : len(tokenizer(prompt).input_ids)] = -100
        yield {**enc, "labels": labels}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model"), parser.add_argument("--out", default="neft_loop")
    parser.add_argument("--steps", type=int, default=30), parser.add_argument("--mode", default="delta")
    parser.add_argument("--selector", default="cosine"), parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    tokenizer.padding_side = "right"
    model = model.to(accelerator.device)
    data = [{k: v.to(accelerator.device) for k, v in b.items()} for b in batches(tokenizer, django_pairs("de", 60), 4)]

    mask = select_neurons(model, data[:8], args.selector, param_ratio=0.06)  # 1. which neurons (8 batches)
    handle = apply_neurons(model, mask, mode=args.mode)                     # 2. only those train
    optimizer = handle.make_optimizer(torch.optim.AdamW, lr=args.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    for step in range(args.steps):
        loss = model(**data[step % len(data)]).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step + 1}: loss {loss.item():.3f}")
    handle.save(args.out)  # neft_delta.safetensors (delta) or the model (hooks), + neuron_mask.safetensors
    print(f"trained {mask} -> {args.out}")
    return handle


if __name__ == "__main__":
    main()
