"""Multi-process agreement: every rank must train the same neurons.

Selection runs on the main process only; the resulting mask is broadcast to all ranks, so data-driven
selectors need not be deterministic across processes.
"""

from __future__ import annotations

from typing import Any

import torch

from .mask import NeuronMask
from .neurons import NeuronMap


def broadcast_mask(mask: NeuronMask | None, neuron_map: NeuronMap, accelerator: Any) -> NeuronMask:
    """Send the main process's mask to every rank (``mask`` is ``None`` on the other ranks)."""
    import torch.distributed as dist

    payload = [None]
    if accelerator.is_main_process:
        payload = [(mask.selected, mask.info, mask.metadata)]
    dist.broadcast_object_list(payload, src=0)
    selected, info, metadata = payload[0]
    received = NeuronMask({n: torch.as_tensor(t) for n, t in selected.items()}, info, metadata)
    received.check_fits(neuron_map)
    return received
