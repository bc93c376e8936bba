"""NeFT under real DDP: two CPU processes over gloo (``torchrun``), checked against one process.

Each mode trains ``tests/ddp_train.py`` under ``torchrun --nproc_per_node 2`` (per-device batch 2), hooks
mode with the data-driven ``grad_norm`` test selector and delta mode with the paper's ``cosine`` (its probe
trains on every rank), then trains one process in-process with the same global batch (4 per micro-batch)
and rank 0's mask. Accelerate shards a step's batch of the same seeded permutation, so both runs see
the same samples each step; TRL normalises the loss by the global token count in both; DDP averages the
gradients. The runs then differ only in float summation order: observed |loss diff| ~5e-7 and
|weight diff| ~5e-8 after 3 steps. The tolerances (loss 1e-5 relative, weights 1e-5) leave 20-100x of
headroom, while every real fault is far larger: rank-local gradients make the ranks' weights differ, a
wrong mask or a moved frozen row breaks bit-equality, and (with SGD, whose step is proportional to the
gradient) a wrong gradient scale moves the weights by ~lr * |grad| ~ 1e-3.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model, rank_results, torchrun
from ddp_train import ScriptArgs, train_and_report

from neft_trl import build_neuron_map
from neft_trl.distributed import check_sharded_setup

SCRIPT = Path(__file__).with_name("ddp_train.py")
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def _run_ddp_and_reference(tmp_path: Path, mode: str, *script_args: str) -> tuple[list[dict], dict]:
    ddp_out = tmp_path / "ddp"
    done = torchrun(SCRIPT, ddp_out, "--mode", mode, "--batch_size", "2", *script_args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [rank_results(ddp_out, 0), rank_results(ddp_out, 1)]
    options = dict(zip(script_args[::2], script_args[1::2], strict=True))
    reference = ScriptArgs(output_dir=str(tmp_path / "single"), mode=mode, selector="random", batch_size=4,
                           mask_path=str(ddp_out / "rank0_mask.safetensors"),
                           optim=options.get("--optim", "adamw_torch"),
                           weight_decay=float(options.get("--weight_decay", 0.1)),
                           grad_accum=int(options.get("--grad_accum", 1)))
    train_and_report(reference)
    return ranks, rank_results(tmp_path / "single", 0)


def _check_agreement(ranks: list[dict], single: dict) -> None:
    """Real DDP, one mask everywhere, ranks bit-identical, and the same run as one process with the global batch."""
    for r in ranks:
        assert r["distributed_type"] == "DistributedType.MULTI_CPU" and r["num_processes"] == 2
    assert ranks[0]["mask"] == ranks[1]["mask"] == single["mask"]
    # Each rank scored its own shard of the data: without the broadcast the ranks would train different masks.
    scores0, scores1 = ranks[0]["scores"], ranks[1]["scores"]
    assert scores0 is None or any(not torch.equal(scores0[k], scores1[k]) for k in scores0)
    params0, params1 = ranks[0]["params"], ranks[1]["params"]
    assert params0.keys() == params1.keys() == single["params"].keys()
    assert all(torch.equal(params0[k], params1[k]) for k in params0)
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(single["losses"]) == len(ranks[0]["losses"]) == 3
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single["losses"]), rtol=LOSS_RTOL, atol=0)
    for k in params0:
        torch.testing.assert_close(params0[k], single["params"][k], rtol=0, atol=WEIGHT_ATOL, msg=k)


def test_hooks_mode_under_ddp_matches_one_process(tmp_path):
    # Gradient accumulation 2: DDP skips the all-reduce (no_sync) on the first micro-batch; masks must still hold.
    ranks, single = _run_ddp_and_reference(tmp_path, "hooks", "--optim", "adamw_torch", "--weight_decay", "0.1",
                                           "--grad_accum", "2")
    _check_agreement(ranks, single)

    initial = make_model("llama")
    neuron_map = build_neuron_map(initial, "vector", False, None)
    mask, trained = ranks[0]["mask"], ranks[0]["params"]
    changed_selected = 0
    for name, before in initial.named_parameters():
        after = trained[name]
        proj = neuron_map.by_name.get(name.rsplit(".", 1)[0])
        if proj is None or not name.endswith("weight"):  # attention, norms, embeddings, head; no MLP bias in llama
            assert torch.equal(after, before.detach()), f"{name} is not a neuron weight but changed"
            continue
        keep = mask.selected[proj.name]
        dim = proj.neuron_dim
        frozen = (~keep).nonzero().flatten()
        assert torch.equal(after.index_select(dim, frozen), before.detach().index_select(dim, frozen)), name
        selected = keep.nonzero().flatten()
        changed_selected += int(not torch.equal(after.index_select(dim, selected),
                                                before.detach().index_select(dim, selected)))
    assert changed_selected == len(list(neuron_map))  # every projection's selected neurons trained (under decay)


def test_delta_mode_under_ddp_matches_one_process(tmp_path):
    # The paper's cosine selector: its probe fine-tunes on every rank, outside DDP, before the mask is broadcast.
    ranks, single = _run_ddp_and_reference(tmp_path, "delta", "--selector", "cosine", "--optim", "sgd",
                                           "--weight_decay", "0.0")
    assert ranks[0]["mask"].metadata["selector"] == "cosine"
    _check_agreement(ranks, single)

    initial = dict(make_model("llama").named_parameters())
    trained = ranks[0]["params"]
    deltas = [k for k in trained if ".neft_delta." in k]
    assert deltas and set(trained) - set(deltas) == set(initial)
    assert all(torch.equal(trained[k], initial[k].detach()) for k in initial)  # base weights never move
    assert all(trained[k].abs().sum() > 0 for k in deltas if k.endswith("weight"))


def test_ranks_that_would_train_alone_are_refused(tmp_path):
    """torchrun on a CPU machine without use_cpu=True: accelerate sets up one process per rank (DistributedType.NO)."""
    done = torchrun(SCRIPT, tmp_path / "out", "--use_cpu", "False", "--selector", "random")
    assert done.returncode != 0
    assert "each process would train alone" in done.stderr + done.stdout
    assert "use_cpu=True, ddp_backend='gloo'" in done.stderr + done.stdout
    assert not (tmp_path / "out" / "rank0.json").exists()


def _sharded_trainer(fsdp: int | None = None, deepspeed: dict | None = None, weight_decay: float = 0.0):
    """The attributes check_sharded_setup reads, as a Trainer has them after __init__ (``fsdp``: its version)."""
    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=deepspeed),
                            fsdp_plugin=SimpleNamespace(fsdp_version=fsdp) if fsdp else None)
    return SimpleNamespace(
        is_fsdp_enabled=fsdp is not None, is_deepspeed_enabled=deepspeed is not None,
        accelerator=SimpleNamespace(state=state), args=SimpleNamespace(weight_decay=weight_decay),
    )


@pytest.mark.parametrize(
    ("version", "mode", "error"),
    [(2, "hooks", "hooks' does not support FSDP.*neft_mode='delta' with FSDP2.*DDP"),
     (1, "hooks", "hooks' does not support FSDP"),
     (1, "delta", "FSDP2 only, this run uses FSDP1.*'version': 2")],
)
def test_fsdp_setups_that_cannot_hold_the_mask_are_refused(version, mode, error):
    with pytest.raises(ValueError, match=error):
        check_sharded_setup(_sharded_trainer(fsdp=version), mode)


def test_fsdp2_delta_mode_is_allowed():
    check_sharded_setup(_sharded_trainer(fsdp=2), "delta")  # deltas attached before wrapping: tests/test_fsdp.py


@pytest.mark.parametrize(
    ("config", "mode", "weight_decay", "error"),
    [
        ({"zero_optimization": {"stage": 3}}, "delta", 0.0, "ZeRO-3.*stage 2"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, "delta", 0.0, "Remove the 'optimizer'"),
        ({"zero_optimization": {"stage": 2}}, "hooks", 0.1, "weight_decay=0.*neft_mode='delta'"),
        ({"zero_optimization": {"stage": "auto"}}, "delta", 0.0, "set it to 0, 1 or 2"),
    ],
)
def test_deepspeed_setups_that_cannot_hold_the_mask_are_refused(config, mode, weight_decay, error):
    with pytest.raises(ValueError, match=error):
        check_sharded_setup(_sharded_trainer(deepspeed=config, weight_decay=weight_decay), mode)


@pytest.mark.parametrize(("stage", "mode", "weight_decay"), [(2, "delta", 0.1), (2, "hooks", 0.0), (1, "hooks", 0.0)])
def test_deepspeed_zero_1_and_2_are_allowed(stage, mode, weight_decay):
    check_sharded_setup(_sharded_trainer(deepspeed={"zero_optimization": {"stage": stage}}, weight_decay=weight_decay),
                        mode)
    check_sharded_setup(_sharded_trainer(), mode)  # plain DDP / one process
