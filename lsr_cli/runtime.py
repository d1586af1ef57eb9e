"""Where and how a refinement runs: device choice, TF32, peak memory, progress sinks."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

from .errors import DeviceError

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class ProgressSink(Protocol):
    """Receives progress: ``begin`` returns an ``advance(amount)`` callable; ``end`` closes it."""

    def begin(self, description: str, total: int) -> Callable[[int], None]: ...

    def end(self) -> None: ...


class NoProgress:
    """A :class:`ProgressSink` that ignores everything."""

    def begin(self, description: str, total: int) -> Callable[[int], None]:
        return lambda amount: None

    def end(self) -> None:
        return None


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; raises :class:`DeviceError`."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} requested but CUDA is not available on this machine; use --device cpu")
    dev = torch.device(spec)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


@contextmanager
def no_tf32() -> Iterator[None]:
    """Disable TF32 (it silently ruins least-squares accuracy) for the duration."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak memory so far: CUDA allocator peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"


def start_run(dtype_name: str, device_spec: str, seed: int) -> tuple[torch.dtype, torch.device, torch.Generator]:
    """Dtype, device (peak-memory counter reset on CUDA) and the run's seeded CPU generator."""
    device = resolve_device(device_spec)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return TORCH_DTYPES[dtype_name], device, torch.Generator().manual_seed(seed)
