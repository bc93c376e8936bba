"""The ``neft-trl`` command, run in a subprocess on a tiny Llama saved to disk: files written and numbers printed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from conftest import make_dataset, make_model, make_tokenizer
from safetensors.torch import load_file

from neft_trl import NeuronMask
from neft_trl.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
FAST = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--max_length", "32"]


def neft_trl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neft_trl.cli", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny Llama + tokenizer, a jsonl data file, and two masks: ``a`` selected by the CLI in a
    subprocess (as a user runs it), ``b`` through ``main()`` in this process (same code, faster)."""
    root = tmp_path_factory.mktemp("cli")
    make_model("llama").save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    make_dataset(16).to_json(root / "data.jsonl")
    common = ["--model_name_or_path", root / "model", "--dataset_name", root / "data.jsonl", "--selector", "random"]
    done = neft_trl("select", *common, "--num_neurons", "40", "--seed", "3", "--output_dir", root / "sel_a",
                    "--mask_out", root / "a.safetensors", "--plot", *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    (root / "select_a.out").write_text(done.stdout)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(list(map(str, ["select", *common, "--neuron_ratio", "0.25", "--seed", "4", "--output_dir",
                                   root / "sel_b", *FAST]))) == 0
    os.replace(root / "sel_b" / "neuron_mask.safetensors", root / "b.safetensors")
    return root
def test_console_script_is_declared():
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "neft-trl"]
    assert script.value == "neft_trl.cli:main"


def test_select_writes_the_mask_report_and_plots(workdir):
    a, b = NeuronMask.load(workdir / "a.safetensors"), NeuronMask.load(workdir / "b.safetensors")
    assert a.num_selected == 2 * 40 and a.metadata["selector"] == "random" and a.metadata["seed"] == "3"
    assert b.num_selected == round(0.25 * b.num_total) and a != b
    assert a.num_total == 2 * 2 * 48  # 2 layers x (up rows + down columns) x intermediate 48
    total = sum(p.numel() for p in make_model("llama").parameters())
    assert a.metadata["model_parameters"] == str(total)  # so reports can show the paper's x% later
    out = (workdir / "select_a.out").read_text()
    assert "| 80 | 41.67% |" in out  # 40 MLP channels = 80 of the 192 neuron vectors
    for layer, count in a.per_layer_counts().items():
        assert f"| {layer} | " in out and f" | {count} | " in out
    for png in ("a_heatmap.png", "a_layers.png"):
        assert (workdir / png).stat().st_size > 5000


def test_report_numbers_union_and_intersection(workdir, capsys):
    a, b = NeuronMask.load(workdir / "a.safetensors"), NeuronMask.load(workdir / "b.safetensors")
    paths = [str(workdir / "a.safetensors"), str(workdir / "b.safetensors")]
    assert main(["report", *paths, "--json", "--union", str(workdir / "u.safetensors"),
                 "--intersection", str(workdir / "i.safetensors")]) == 0
    done = capsys.readouterr()
    data = json.loads(done.out)
    assert [m["num_selected"] for m in data["masks"]] == [a.num_selected, b.num_selected]
    assert data["overlap"][0][1] == pytest.approx(a.overlap(b)) and data["overlap"][1][0] == pytest.approx(b.overlap(a))
    assert data["jaccard"][0][1] == pytest.approx((a & b).num_selected / (a | b).num_selected)
    total = int(a.metadata["model_parameters"])
    assert data["masks"][0]["parameter_share"] == pytest.approx(a.trainable_parameters / total)
    per_layer = {int(k): sum(v.values()) for k, v in data["masks"][0]["per_layer"].items()}
    assert per_layer == a.per_layer_counts()
    union, inter = NeuronMask.load(workdir / "u.safetensors"), NeuronMask.load(workdir / "i.safetensors")
    assert union == (a | b) and inter == (a & b) and 0 < inter.num_selected < union.num_selected
    assert json.loads(union.metadata["combined_from"]) == paths
    assert "Union (" in done.err and "Intersection (" in done.err  # stdout stays pure JSON


def test_train_with_a_saved_mask_changes_only_its_neurons(workdir):
    out = workdir / "trained"
    done = neft_trl("train", "--model_name_or_path", workdir / "model", "--dataset_name", workdir / "data.jsonl",
                    "--neuron_mask_path", workdir / "a.safetensors", "--max_steps", "2", "--learning_rate", "0.01",
                    "--per_device_train_batch_size", "4", "--save_strategy", "no", "--output_dir", out, *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    mask = NeuronMask.load(workdir / "a.safetensors")
    assert NeuronMask.load(out) == mask and "| 40 |" in done.stdout
    before, after = make_model("llama").state_dict(), load_file(out / "model.safetensors")
    for name, tensor in before.items():
        module = name.removesuffix(".weight")
        if module not in mask.selected:
            assert torch.equal(after[name], tensor), name  # frozen: bit-identical
            continue
        dim = 0 if mask.info[module]["role"] == "up" else 1
        chosen = mask.selected[module]
        assert torch.equal(after[name].index_select(dim, (~chosen).nonzero().flatten()),
                           tensor.index_select(dim, (~chosen).nonzero().flatten())), name
        if chosen.any():
            assert not torch.equal(after[name].index_select(dim, chosen.nonzero().flatten()),
                                   tensor.index_select(dim, chosen.nonzero().flatten())), name


def test_plots_command(workdir, tmp_path, capsys):
    assert main(["plots", str(workdir / "a.safetensors"), str(workdir / "b.safetensors"), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_heatmap.png", "a_layers.png", "b_heatmap.png",
                                                          "b_layers.png"]


def test_bad_masks_exit_2_with_one_line(workdir, tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    other = NeuronMask.load(workdir / "a.safetensors")
    name = next(iter(other.selected))
    other.selected[name] = other.selected[name][:-1]
    other.save(tmp_path / "short.safetensors")
    cases = [([str(tmp_path / "missing.safetensors")], "No neuron mask at"),
             ([str(garbage)], "Cannot read neuron mask"),
             ([str(workdir / "a.safetensors"), str(tmp_path / "short.safetensors")], "do not match")]
    for masks, message in cases:
        assert main(["report", *masks]) == 2
        err = capsys.readouterr().err
        assert err.startswith("neft-trl report: error: ") and message in err and err.count("\n") == 1, err
    assert main(["report", str(workdir / "a.safetensors"), "--union", str(tmp_path / "u.bin")]) == 0
    assert (tmp_path / "u.bin" / "neuron_mask.safetensors").is_file()  # a non-.safetensors path is a folder


def test_bad_setup_exits_2_with_one_line(workdir, tmp_path, capsys):
    model = ["--model_name_or_path", str(workdir / "model"), "--output_dir", str(tmp_path), *FAST]
    cases = [(["train", *model, "--dataset_name", str(tmp_path / "none.jsonl")], "No such data file or folder"),
             (["train", *model], "--dataset_name is required"),
             (["select", *model, "--neuron_ratio", "0.1", "--num_neurons", "3"], "Set exactly one neuron budget"),
             (["select", *model, "--dataset_name", str(workdir / "data.jsonl"), "--selector", "nope"],
              "Unknown neuron selector 'nope'"),
             (["select", *model, "--dataset_name", str(workdir / "data.jsonl"), "--dataset_train_split", "dev"],
              "holds one split only"),
             (["train", *model, "--dataset_name", str(workdir / "data.jsonl"), "--neuron_mask_path",
               str(tmp_path / "short.safetensors")], "does not fit this model"),
             (["select", *model], "--dataset_name is required"),
             (["select", *model, "--dataset_name", str(workdir / "data.jsonl"), "--selector", "random",
               "--num_neurons", "100000"], "exceeds the 96 candidate neurons"),  # found while selecting
             (["select", *model, "--dataset_name", str(workdir / "data.jsonl"), "--selector", "random",
               "--selector_kwargs", '{"colour": "red"}'],
              "Bad selector_kwargs ['colour'] for selector random")]
    short = NeuronMask.load(workdir / "a.safetensors")
    name = next(iter(short.selected))
    short.selected[name] = short.selected[name][:-1]
    short.save(tmp_path / "short.safetensors")
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"neft-trl {argv[0]}: error: ") and message in err, err


BUG = r"""
import sys
import neft_trl.cli.run as cli_run
from neft_trl.cli import main

def load_split(*args, **kwargs):
    raise ValueError("a bug inside neft_trl, not a user mistake")

cli_run.load_split = load_split
sys.exit(main(sys.argv[1:]))
"""


def test_an_unexpected_exception_keeps_its_traceback_and_exits_1(workdir, tmp_path):
    """A ValueError that is no ``UsageError`` is a bug: not turned into a one-line exit 2 that hides where it was."""
    argv = ["train", "--model_name_or_path", workdir / "model", "--dataset_name", workdir / "data.jsonl",
            "--output_dir", tmp_path, *FAST]
    proc = subprocess.run([sys.executable, "-c", BUG, *map(str, argv)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "in load_split" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ValueError: a bug inside neft_trl, not a user mistake"
    assert "neft-trl train: error" not in proc.stderr


def test_load_split_reads_files_and_saved_folders(tmp_path):
    from datasets import DatasetDict

    from neft_trl.data_sources import DataSourceError, load_split

    data = make_dataset(6)
    data.to_csv(tmp_path / "d.csv", index=False)
    assert load_split(str(tmp_path / "d.csv"), None, "train")["text"] == data["text"]
    DatasetDict({"train": data, "test": make_dataset(3, seed=1)}).save_to_disk(tmp_path / "saved")
    assert load_split(str(tmp_path / "saved"), None, "test")["text"] == make_dataset(3, seed=1)["text"]
    with pytest.raises(DataSourceError, match=r"has splits \['train', 'test'\]"):
        load_split(str(tmp_path / "saved"), None, None)
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(DataSourceError, match="unknown data file type"):
        load_split(str(tmp_path / "d.xml"), None, "train")
