"""MoE layouts with one ``nn.Linear`` MLP per expert (transformers 4.x Mixtral/Qwen2-MoE), on any version.

The module tree is built here with plain torch, named as transformers 4.57 names it, so the test does not
depend on the installed transformers storing experts this way.
"""

from __future__ import annotations

import torch
from torch import nn

from neft_trl.budget import Budget, select_top
from neft_trl.neurons import build_neuron_map
from neft_trl.training import GradientMaskTraining


class _Expert(nn.Module):  # Mixtral 4.x MixtralBlockSparseTop2MLP: w1 gate, w3 up, w2 down
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(8, 6, bias=False), nn.Linear(8, 6, bias=False)
        self.w2 = nn.Linear(6, 8, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 3, bias=False)
        self.experts = nn.ModuleList(_Expert() for _ in range(3))

    def forward(self, x):
        weights = self.gate(x).softmax(-1)
        return sum(weights[..., e:e + 1] * expert(x) for e, expert in enumerate(self.experts))


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block_sparse_moe = _Block()


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Layer() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer.block_sparse_moe(x)
        return x


def test_per_expert_linear_experts_are_tagged_with_layer_and_expert_and_train_with_hooks():
    torch.manual_seed(0)
    model = _Model()
    neuron_map = build_neuron_map(model, include_gate=True)
    assert neuron_map.num_layers == 2 and neuron_map.num_experts == 3 and len(neuron_map) == 2 * 3 * 3
    proj = neuron_map.by_name["layers.1.block_sparse_moe.experts.2.w3"]
    assert (proj.layer, proj.expert, proj.role) == (1, 2, "up")
    assert neuron_map.by_name["layers.0.block_sparse_moe.experts.0.w1"].role == "gate"
    assert all("gate.weight" not in p.name for p in neuron_map)  # the router is not a candidate
    scores = {g.key: torch.rand(g.size) for g in neuron_map.groups}
    mask = select_top(neuron_map, scores, Budget.resolve(neuron_ratio=0.5), 1000, scope="per_expert")
    assert mask.per_expert_counts() == {layer: {e: 3 * 3 for e in range(3)} for layer in range(2)}
    router = model.layers[0].block_sparse_moe.gate.weight.detach().clone()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    training = GradientMaskTraining(model, neuron_map, mask)
    training.attach()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(5, 8)).square().mean().backward()
    optimizer.step()
    assert torch.equal(model.layers[0].block_sparse_moe.gate.weight, router)
    w3 = dict(model.named_parameters())["layers.1.block_sparse_moe.experts.2.w3.weight"]
    keep = mask.selected["layers.1.block_sparse_moe.experts.2.w3"]
    before = original["layers.1.block_sparse_moe.experts.2.w3.weight"]
    assert torch.equal(w3[~keep], before[~keep]) and not torch.equal(w3[keep], before[keep])
