"""neuron_report: counts per layer and role, overlap/Jaccard matrices, and the trainer's report and logged stats."""

from __future__ import annotations

import pytest
import torch
from conftest import make_dataset, make_model, make_tokenizer, tiny_args
from transformers import TrainerCallback

from neft_trl import NeFTSFTTrainer, NeuronMask
from neft_trl.report import neuron_report, summarize


def _mask(bits: dict[str, list[int]], roles: dict[str, tuple[int, str]], selector: str = "manual") -> NeuronMask:
    selected = {name: torch.tensor(b, dtype=torch.bool) for name, b in bits.items()}
    info = {name: {"layer": layer, "role": role, "params_per_neuron": 10} for name, (layer, role) in roles.items()}
    return NeuronMask(selected, info, {"selector": selector, "budget": "num_neurons=3"})


ROLES = {"l0.up": (0, "up"), "l0.down": (0, "down"), "l1.up": (1, "up"), "l1.down": (1, "down")}
A = _mask({"l0.up": [1, 1, 0, 0], "l0.down": [0, 0, 0, 0], "l1.up": [0, 0, 0, 1], "l1.down": [1, 0, 0, 0]}, ROLES)
B = _mask({"l0.up": [1, 0, 0, 0], "l0.down": [0, 0, 1, 0], "l1.up": [0, 0, 0, 1], "l1.down": [0, 1, 0, 0]}, ROLES)


def test_summary_counts_per_layer_and_role():
    s = summarize(A, "a", total_parameters=400)
    assert s.per_layer == {0: {"up": 2, "down": 0}, 1: {"up": 1, "down": 1}}
    assert s.candidates == {0: {"up": 4, "down": 4}, 1: {"up": 4, "down": 4}}
    assert s.roles == ["up", "down"]
    assert (s.num_selected, s.num_total, s.trainable_parameters) == (4, 16, 40)
    assert s.selected_share == 0.25 and s.parameter_share == 0.1
    assert s.layer_totals() == {0: 2, 1: 2}


def test_overlap_and_jaccard_matrices():
    r = neuron_report(A, [B], names=["a", "b"])
    # A & B = {l0.up[0], l1.up[3]}: 2 shared; |A| = |B| = 4; |A | B| = 6.
    assert r.overlap == [[1.0, 0.5], [0.5, 1.0]]
    assert r.jaccard == [[1.0, 2 / 6], [2 / 6, 1.0]]
    smaller = _mask({"l0.up": [1, 0, 0, 0], "l0.down": [0] * 4, "l1.up": [0] * 4, "l1.down": [0] * 4}, ROLES)
    r = neuron_report(A, [smaller])
    assert r.overlap[0][1] == 0.25 and r.overlap[1][0] == 1.0  # asymmetric, as the paper's Table 6


def test_markdown_lists_every_number():
    text = neuron_report(A, [B], names=["a", "b"], total_parameters=400).to_markdown()
    assert "| a | manual | num_neurons=3 | 4 | 25.00% | 40 | 10.00% |" in text
    assert "| 0 | 2 | 0 | 2 | 25.00% |" in text  # layer 0 of a: up 2, down 0
    assert "| a | 100.00% | 50.00% |" in text and "| b | 33.33% | 100.00% |" in text


def test_mismatched_masks_and_names_are_clear_errors():
    other = _mask({"l0.up": [1, 0, 0], "l0.down": [0] * 4, "l1.up": [0] * 4, "l1.down": [0] * 4}, ROLES)
    with pytest.raises(ValueError, match="does not fit the other mask"):
        neuron_report(A, [other])
    with pytest.raises(ValueError, match="one name per mask"):
        neuron_report(A, [B], names=["only-one"])


def test_scalars_for_loggers():
    stats = neuron_report(A, total_parameters=400).scalars()
    assert stats["neft/selected_neurons"] == 4 and stats["neft/trainable_parameter_share"] == 0.1
    assert stats["neft/layer_0_neurons"] == 2 and stats["neft/layer_0_up_neurons"] == 2
    assert stats["neft/layer_1_down_neurons"] == 1


class _Recorder(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_trainer_report_and_stats_reach_the_loggers(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # transformers 5; 4.x: output_dir/runs
    recorder = _Recorder()
    args = tiny_args(tmp_path, max_steps=1, selector="random", neuron_ratio=0.25, report_to=["tensorboard"])
    trainer = NeFTSFTTrainer(make_model("llama"), make_dataset(8), args=args, processing_class=make_tokenizer(),
                             callbacks=[recorder])
    with pytest.raises(ValueError, match="No neuron mask yet"):
        trainer.neuron_report()
    trainer.train()
    report = trainer.neuron_report()
    mask = trainer.neuron_mask
    s = report.masks[0]
    assert s.num_selected == mask.num_selected == round(0.25 * mask.num_total)
    # the model's own parameters: the share is of the model, not of the model plus its neuron deltas
    assert s.total_parameters == sum(p.numel() for n, p in trainer.model.named_parameters() if ".neft_delta." not in n)
    assert s.layer_totals() == mask.per_layer_counts()

    neft_logs = [log for log in recorder.logs if "neft/selected_neurons" in log]
    assert len(neft_logs) == 1
    logged = {k: v for k, v in neft_logs[0].items() if k != "epoch"}
    assert logged == {**report.scalars(), "neft/selection_seconds": pytest.approx(logged["neft/selection_seconds"])}
    assert logged["neft/layer_1_down_neurons"] == s.per_layer[1]["down"]

    event_files = list(tmp_path.rglob("events.out.tfevents*"))
    assert len(event_files) == 1
    events = EventAccumulator(str(event_files[0])).Reload()
    tags = events.Tags()["scalars"]
    assert "train/neft/selected_neurons" in tags and "train/neft/layer_0_up_neurons" in tags
    assert events.Scalars("train/neft/selected_neurons")[0].value == mask.num_selected
    assert events.Scalars("train/neft/layer_0_up_neurons")[0].value == s.per_layer[0]["up"]
