"""Plots: PNG files of the expected pixel size that actually show the selection."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_model
from matplotlib.image import imread

from neft_trl import Budget, NeuronMask, build_neuron_map
from neft_trl.budget import select_top
from neft_trl.plots import plot_heatmap, plot_layer_counts, plot_mask, selection_matrix


@pytest.fixture(scope="module")
def mask() -> NeuronMask:
    neuron_map = build_neuron_map(make_model("llama"), include_gate=True)
    g = torch.Generator().manual_seed(0)
    scores = {group.key: torch.rand(group.size, generator=g) for group in neuron_map.groups}
    return select_top(neuron_map, scores, Budget(neuron_ratio=0.2), total_parameters=10**6)


def _not_blank(path) -> np.ndarray:
    pixels = imread(path)[..., :3]
    assert pixels.std() > 0.05  # many colours, not one flat background
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    return pixels


@pytest.mark.parametrize("plot", [plot_mask, plot_heatmap, plot_layer_counts])
def test_png_has_the_requested_size_and_content(mask, tmp_path, plot):
    path = plot(mask, tmp_path / "sub" / "plot.png", size=(6.0, 4.0), dpi=50)
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _not_blank(path).shape[:2] == (200, 300)  # height, width = size * dpi


def test_heatmap_pixels_follow_the_selection(tmp_path):
    """One layer fully selected, the other empty: the two heatmap rows must look different."""
    selected = {"l0.up": torch.ones(8, dtype=torch.bool), "l1.up": torch.zeros(8, dtype=torch.bool)}
    info = {"l0.up": {"layer": 0, "role": "up", "params_per_neuron": 4},
            "l1.up": {"layer": 1, "role": "up", "params_per_neuron": 4}}
    mask = NeuronMask(selected, info)
    full = imread(plot_heatmap(mask, tmp_path / "full.png", size=(4.0, 4.0), dpi=50))
    flipped = NeuronMask({"l0.up": selected["l1.up"], "l1.up": selected["l0.up"]}, info)
    other = imread(plot_heatmap(flipped, tmp_path / "flipped.png", size=(4.0, 4.0), dpi=50))
    assert not np.array_equal(full, other)


def test_selection_matrix_bins_wide_layers_and_pads_narrow_ones():
    selected = {"a": torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool), "b": torch.tensor([1, 0], dtype=torch.bool)}
    info = {"a": {"layer": 0, "role": "down", "params_per_neuron": 1},
            "b": {"layer": 1, "role": "down", "params_per_neuron": 1}}
    matrix = selection_matrix(NeuronMask(selected, info), "down", max_columns=3)
    np.testing.assert_array_equal(matrix[0], [1.0, 0.0, 0.5])
    assert matrix[1, 0] == 0.5 and np.isnan(matrix[1, 1:]).all()  # [1, 0] then padding
    with pytest.raises(ValueError, match="no 'gate' projections"):
        selection_matrix(NeuronMask(selected, info), "gate")


def test_non_png_path_is_refused(mask, tmp_path):
    with pytest.raises(ValueError, match="ending in .png"):
        plot_mask(mask, tmp_path / "plot.jpg")


BACKEND_SCRIPT = r"""
import json, sys
import matplotlib
matplotlib.use("svg")  # the caller's choice, as a notebook's inline backend would be
import torch
from neft_trl import NeuronMask
from neft_trl.plots import plot_mask
mask = NeuronMask({"l0.up": torch.tensor([True, False, True])}, {"l0.up": {"layer": 0, "role": "up",
                                                                         "params_per_neuron": 4}})
plot_mask(mask, sys.argv[1])
print("RESULT" + json.dumps({"backend": matplotlib.get_backend(), "pyplot": "matplotlib.pyplot" in sys.modules}))
"""


def test_importing_and_plotting_leaves_the_callers_backend_alone(tmp_path):
    """In a fresh process (this one has imported neft_trl.plots already): the backend stays the caller's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MPLBACKEND", None)
    proc = subprocess.run([sys.executable, "-c", BACKEND_SCRIPT, str(tmp_path / "p.png")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT"):])
    assert result == {"backend": "svg", "pyplot": False}
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
