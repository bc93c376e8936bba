"""What a training run costs: wall time per optimizer step and the process's peak resident memory (used by
examples/quickstart.py and benchmarks/).

Step time comes from a ``TrainerCallback`` (``on_step_begin`` -> ``on_step_end``), so it holds forward,
backward and the optimizer step, and leaves out selection (which runs before the first step), evaluation
and logging (which run after ``on_step_end``). The first step is dropped from the median: it pays for
lazy allocations and kernel warm-up that no later step repeats.

Peak memory is taken over the optimizer steps only (resident model, gradients, optimizer state and the
step's activations), not over evaluation, whose large-batch logits would otherwise set every method's peak:
``resource.getrusage`` of the method's own process, with the high-water mark reset (``/proc/self/clear_refs``,
Linux) before each step; on a GPU also ``torch.cuda.max_memory_allocated``, reset the same way. The resets
happen outside the timed interval.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Wall time and peak memory of every optimizer step of a ``Trainer`` run (seconds, MiB)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.peak_rss_mb = 0.0
        self.peak_cuda_mb = 0.0
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels are queued, not done, when Python returns
        self.seconds.append(time.perf_counter() - self._start)
        self._start = None
        self.peak_rss_mb = max(self.peak_rss_mb, peak_rss_mb())
        if torch.cuda.is_available():
            self.peak_cuda_mb = max(self.peak_cuda_mb, torch.cuda.max_memory_allocated() / 2**20)

    def median(self, skip_first: int = 1) -> float:
        """Median step time without the first ``skip_first`` steps (all steps if there are no others)."""
        if not self.seconds:
            raise ValueError("No optimizer step was timed: the run trained for zero steps (check max_steps).")
        steady = self.seconds[skip_first:] or self.seconds
        return statistics.median(steady)


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS high-water mark to its current RSS; False where the OS cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Peak resident memory of this process since start (or since the last ``reset_peak_rss``), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform.startswith("linux") else peak / 2**20  # kB on Linux, bytes on macOS
