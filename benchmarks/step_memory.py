"""Peak memory of one call: CUDA's allocator statistics, or on CPU the live tensor storages it creates."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from step_timing import synchronize
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class AllocationTracker(TorchDispatchMode):
    """Bytes of the tensor storages created while the mode is active and still alive, and their peak.

    Every op's output storage is counted once when it appears and uncounted when it is freed (a weakref
    finalizer on the storage), so CPU allocator caching does not blur the figure; backward ops run under the
    mode too. Pre-existing tensors (parameters, inputs) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._seen = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                if storage not in self._seen:
                    self._seen[storage] = storage.nbytes()
                    weakref.finalize(storage, self._free, storage.nbytes())
                    self.live_bytes += storage.nbytes()
                    self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


def peak_memory_bytes(run: Callable[[], None], device: torch.device) -> float:
    """Most bytes allocated during ``run()`` above those allocated before it. On CPU the tracker is a dispatch
    mode, under which ``torch.compile``'d code runs eagerly: the figure is the eager one."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    tracker = AllocationTracker()
    with tracker:
        run()
    return float(tracker.peak_bytes)
