"""Held-out translation quality: batched greedy generation and corpus chrF/BLEU (sacrebleu).

Eval loss says how well a model predicts the reference; chrF/BLEU say whether what it actually writes is a
translation. The quickstart and the benchmark both report them, from this one implementation, so the
numbers are comparable between methods and runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class TranslationScores:
    chrf: float
    bleu: float
    count: int

    def __str__(self) -> str:
        return f"chrF {self.chrf:5.1f}  BLEU {self.bleu:5.1f}  ({self.count} pairs)"


def _prompt_text(tokenizer: Any, prompt: Prompt) -> tuple[str, bool]:
    """The prompt as the model sees it in training, and whether the tokenizer should add its special tokens."""
    if isinstance(prompt, str):
        return prompt, True
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("Conversational prompts need a tokenizer with a chat template; use plain-text prompts.")
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False), False


@torch.no_grad()
def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    first_line: bool = True,
    show_progress: bool = True,
) -> list[str]:
    """Greedy completions of ``prompts`` (plain strings or chat messages), batched with left padding.

    Prompts are sorted by length so each batch pads little; results come back in the input order.
    ``first_line`` keeps the first line of each completion and stops generating once every row has ended
    a line (translations here are one line; a model that has not learned to stop yet should neither be
    scored on what it rambles after, nor cost the time to generate it).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token: set tokenizer.pad_token (e.g. to its EOS token).")
    texts = [_prompt_text(tokenizer, p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i][0]))
    outputs: list[str] = [""] * len(texts)
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="Generating", disable=not show_progress):
            ids = order[start:start + batch_size]
            add_special = texts[ids[0]][1]
            batch = tokenizer([texts[i][0] for i in ids], return_tensors="pt", padding=True,
                              add_special_tokens=add_special, return_token_type_ids=False).to(device)
            prompt_length = batch["input_ids"].shape[1]
            stop = [_LineEnded(tokenizer, prompt_length)] if first_line else None
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id,
                                       stopping_criteria=StoppingCriteriaList(stop or []))
            new_tokens = generated[:, prompt_length:]
            for i, text in zip(ids, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
                text = text.strip()
                outputs[i] = text.split("\n", 1)[0].strip() if first_line else text
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs


class _LineEnded(StoppingCriteria):
    """Done for a row once its completion holds a newline after some text (a leading newline does not count).

    transformers' ``stop_strings`` cannot say "after some text", and a model that has not learned to end its
    answer would otherwise generate ``max_new_tokens`` of rambling that ``first_line`` throws away.
    """

    def __init__(self, tokenizer: Any, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([("\n" in text.lstrip()) for text in texts], device=input_ids.device)


def bleu_tokenizer(lang: str) -> str:
    """sacrebleu's tokenizer for a target language: Chinese and Japanese/Korean are not space-separated."""
    lang = lang.lower()
    if lang.startswith("zh") or "chinese" in lang:
        return "zh"
    if lang.split("_")[0] in ("ja", "ko") or "japanese" in lang or "korean" in lang:
        return "char"
    return "13a"


def translation_scores(hypotheses: Sequence[str], references: Sequence[str], lang: str = "de") -> TranslationScores:
    """Corpus chrF and BLEU of ``hypotheses`` against one reference each."""
    import sacrebleu

    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"Need one hypothesis per reference, got {len(hypotheses)} and {len(references)}.")
    refs = [list(references)]
    chrf = sacrebleu.corpus_chrf(list(hypotheses), refs).score
    bleu = sacrebleu.corpus_bleu(list(hypotheses), refs, tokenize=bleu_tokenizer(lang)).score
    return TranslationScores(chrf=chrf, bleu=bleu, count=len(references))


def evaluate_translations(
    model: Any, tokenizer: Any, dataset: Any, lang: str = "de", **generate_kwargs: Any
) -> tuple[TranslationScores, list[str]]:
    """Score a prompt-completion dataset with ``prompt`` and ``target`` columns (see ``neft_trl.data``)."""
    missing = {"prompt", "target"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"The evaluation dataset needs 'prompt' and 'target' columns; it lacks {sorted(missing)}.")
    hypotheses = generate_completions(model, tokenizer, dataset["prompt"], **generate_kwargs)
    return translation_scores(hypotheses, dataset["target"], lang), hypotheses
