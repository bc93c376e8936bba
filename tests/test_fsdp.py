"""Delta mode under FSDP2: the functional API + ``fully_shard`` on two CPU ranks (gloo), checked against one process.

``tests/fsdp_train.py`` trains a tiny Llama's cosine-selected neuron deltas with every decoder layer and then
the root wrapped by ``fully_shard``, and again in-process without sharding on the same global batches (see
its docstring for why the two runs compute the same thing). Observed after 3 SGD steps at lr 0.5: |delta
diff| 6e-10 (the deltas reach 4e-3), relative loss diff 1e-7. The 1e-5 tolerances leave 100x and more of
headroom, while a real fault is far larger: unsynchronised gradients make the ranks' deltas differ bit-wise,
a wrong gradient scale (summed instead of averaged over the ranks) moves the deltas by ~1e-3, a moved frozen
weight breaks bit-equality.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_model, rank_results, torchrun
from fsdp_train import global_batches, train_and_report

from neft_trl import NeuronMask, load_neuron_delta
from neft_trl.training.delta_io import read_neuron_delta

SCRIPT = Path(__file__).with_name("fsdp_train.py")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], dict, Path]:
    """(the two FSDP2 ranks' results, the one-process results, the folder the FSDP2 run saved into)."""
    root = tmp_path_factory.mktemp("fsdp")
    done = torchrun(SCRIPT, root / "fsdp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    train_and_report(str(root / "single"))
    ranks = [rank_results(root / "fsdp", 0), rank_results(root / "fsdp", 1)]
    return ranks, rank_results(root / "single", 0), root / "fsdp"


def test_fsdp2_ranks_train_the_same_deltas_as_one_process(runs):
    ranks, single, _ = runs
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    assert ranks[0]["mask"] == ranks[1]["mask"] == single["mask"]
    assert ranks[0]["mask"].metadata["selector"] == "cosine"
    # Really sharded: each rank held part of every delta's rows, together all of them.
    rows = {name: single["params"][f"{name}.neft_delta.weight"].shape[0] for name in ranks[0]["delta_shard_rows"]}
    assert len(rows) == 4  # up and down of both layers hold selected neurons
    for name, total in rows.items():
        held = [r["delta_shard_rows"][name] for r in ranks]
        assert sum(held) == total and max(held) < total, (name, held, total)

    initial = dict(make_model("llama").named_parameters())
    params0, params1 = ranks[0]["params"], ranks[1]["params"]
    deltas = [k for k in params0 if ".neft_delta." in k]
    assert deltas and params0.keys() == params1.keys() == single["params"].keys() == set(initial) | set(deltas)
    for name, before in initial.items():  # frozen base weights: bit-identical on both ranks
        assert torch.equal(params0[name], before.detach()) and torch.equal(params1[name], before.detach()), name
    for name in deltas:
        assert torch.equal(params0[name], params1[name]), f"{name} differs between the ranks"
        assert params0[name].abs().sum() > 0, f"{name} did not train"
        torch.testing.assert_close(params0[name], single["params"][name], rtol=0, atol=TOLERANCE, msg=name)
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(single["losses"]) == 3
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single["losses"]), rtol=TOLERANCE,
                               atol=0)


def test_the_sharded_run_saves_whole_deltas_that_reproduce_the_model(runs):
    ranks, single, out = runs
    assert NeuronMask.load(out / "saved") == ranks[0]["mask"]
    saved, meta = read_neuron_delta(out / "saved")
    assert meta["selector"] == "cosine"
    for name, delta in saved.items():
        assert torch.equal(delta.weight, ranks[0]["params"][f"{name}.neft_delta.weight"]), name

    model = load_neuron_delta(make_model("llama"), out / "saved")
    reference = load_neuron_delta(make_model("llama"), out / "saved")  # the same delta layout...
    reference.load_state_dict(single["params"])  # ... holding the one-process run's values
    batch = global_batches(1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=TOLERANCE)


def test_a_sharded_model_and_differing_masks_are_refused(runs):
    ranks, _, _ = runs
    for r in ranks:
        assert "hold another neuron mask than rank 0" in r["different_masks"]
        assert "broadcast_mask" in r["different_masks"]
        assert r["attach_again"].startswith("Cannot attach neuron deltas on a model sharded by fully_shard")
        assert r["hooks"].startswith("Cannot train hooks mode on a model sharded by fully_shard")
        assert "mode='delta'" in r["hooks"]
        assert r["merge"].startswith("Cannot merge neuron deltas on a model sharded by fully_shard")
        assert "merge_neuron_delta" in r["merge"]
