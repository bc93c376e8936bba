"""Tiny random mixture-of-experts models and the helpers the ``test_moe*.py`` files share.

Mixtral, Qwen2-MoE (with a shared expert), Qwen3-MoE and OLMoE with fused 3-D experts (transformers 5).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

from neft_trl.budget import Budget, select_top
from neft_trl.experts import is_fused_experts
from neft_trl.layers import parameter_count
from neft_trl.mask import NeuronMask

COMMON = dict(vocab_size=64, pad_token_id=0, eos_token_id=2, bos_token_id=2, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
MOE = {
    "mixtral": lambda e: MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=e, num_experts_per_tok=2),
    "qwen2_moe": lambda e: Qwen2MoeConfig(**COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=40,
                                          num_experts=e, num_experts_per_tok=2, decoder_sparse_step=1),
    "qwen3_moe": lambda e: Qwen3MoeConfig(**COMMON, moe_intermediate_size=16, num_experts=e, num_experts_per_tok=2,
                                          decoder_sparse_step=1, head_dim=8),
    "olmoe": lambda e: OlmoeConfig(**COMMON, intermediate_size=20, num_experts=e, num_experts_per_tok=2),
}
TRAINED = ["mixtral", "qwen2_moe", "olmoe"]



def make_moe(arch: str, experts: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(MOE[arch](experts)).float()


def skip_without_fused_experts() -> None:
    """Skip the calling test module where transformers stores experts as per-expert ``nn.Linear`` (4.x)."""
    if not any(is_fused_experts(m) for m in make_moe("mixtral").modules()):
        pytest.skip("this transformers stores experts as per-expert nn.Linear (4.x), not fused 3-D parameters: "
                    "see test_moe_per_expert_linear.py", allow_module_level=True)


def batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (4, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0  # padding, which selectors must not count
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def random_mask(neuron_map, model, ratio: float = 0.3, seed: int = 0) -> NeuronMask:
    g = torch.Generator().manual_seed(seed)
    scores = {grp.key: torch.rand(grp.size, generator=g) for grp in neuron_map.groups}
    return select_top(neuron_map, scores, Budget.resolve(neuron_ratio=ratio), parameter_count(model))


def train(model, training, steps: int = 3, weight_decay: float = 0.0, accumulation: int = 2) -> None:
    training.attach()
    params = [p for p in model.parameters() if p.requires_grad]
    names = training.no_decay_parameter_names()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n not in names]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n in names]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)
    training.install_weight_decay(optimizer, weight_decay)
    model.train()
    data = batches(steps * accumulation)
    for step in range(steps):
        for batch in data[step * accumulation:(step + 1) * accumulation]:
            (model(**batch).loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()
        optimizer.zero_grad()


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batches(1, seed=7)[0]["input_ids"]).logits

