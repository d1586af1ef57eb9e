"""Where and how a refinement runs: device choice, TF32, peak memory, progress sinks."""

from __future__ import annotations

import os
import resource
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

from .errors import DeviceError
from .timeplan import mark_run_start

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_COMPLEX_OF = {torch.float64: torch.complex128, torch.float32: torch.complex64, torch.float16: torch.complex32}


def cast_tensor(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """``t`` on ``device`` with real floating data in ``dtype`` and complex data in its complex
    counterpart (``float64`` → ``complex128``); other dtypes unchanged. ``Tensor.to(float64)``
    would silently drop the imaginary part of a complex tensor."""
    if t.is_complex():
        return t.to(device=device, dtype=_COMPLEX_OF.get(dtype, t.dtype))
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


def cast_module(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Move ``module`` (plain or TorchScript) in place like :func:`cast_tensor` does a tensor.

    A ``copy.deepcopy`` of a TorchScript module (``lsr iterate`` copies the network each
    iteration) holds non-leaf parameters, on which ``Module._apply`` reads ``.grad`` and torch
    warns; nothing reads those gradients here, so that one warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The .grad attribute of a Tensor that is not a leaf", category=UserWarning
        )
        return module._apply(lambda t: cast_tensor(t, dtype, device))


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


def available_memory(device: torch.device) -> int:
    """Free memory in bytes: CUDA free memory on a GPU, else the host's ``MemAvailable``."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def resolve_memory_budget(spec: int | str, device: torch.device) -> int:
    """``lsr.max_memory`` in bytes: ``auto`` is half of :func:`available_memory`."""
    return available_memory(device) // 2 if spec == "auto" else int(spec)


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def warm_up_autodiff(device: torch.device) -> None:
    """One tiny batched JVP and VJP through ``torch.func``, so that the one-time cost of loading
    the autodiff machinery (about 90 MB of host memory, measured here) is not counted by a
    :class:`MemoryMeter` started afterwards."""
    from .linearization import JacobianOperator, ParameterSpace

    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    net = net.to(device=device, dtype=torch.float64)
    space = ParameterSpace({k: v.detach() for k, v in net.named_parameters()})
    op = JacobianOperator(net, space, (torch.zeros(4, 2, dtype=torch.float64, device=device),), 4, 2)
    op.rmatmat(op.matmat(torch.ones(space.num, 2, dtype=torch.float64, device=device)))


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set (``VmHWM``) to the current one; whether Linux allowed it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Peak memory of one run above its start.

    CUDA: the allocator's peak minus what was allocated at the start. CPU: the peak resident
    set (``VmHWM``, reset at the start through ``/proc/self/clear_refs`` where Linux allows)
    minus the resident set at the start, so the libraries, the model and earlier work are not
    counted. Where the peak cannot be reset, the process's lifetime peak is used (an upper
    bound) and :attr:`kind` says so.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._carried = 0  # the peak before the last reset of the counter (see measure)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.start = int(torch.cuda.memory_allocated(device))
            self.kind = "cuda_max_memory_allocated_above_start"
            return
        self.start = _status_kib("VmRSS") or 0
        self.resettable = _reset_peak_rss()
        self.kind = "process_peak_rss_above_start" if self.resettable else "process_lifetime_peak_rss_above_start"

    def _counter_peak(self) -> int:
        if self.device.type == "cuda":
            return max(0, int(torch.cuda.max_memory_allocated(self.device)) - self.start)
        peak = _status_kib("VmHWM")
        if peak is None:
            peak = peak_memory_bytes(self.device)[0]
        return max(0, peak - self.start)

    def peak_above_start(self) -> int:
        return max(self._carried, self._counter_peak())

    def current_above_start(self) -> int:
        """Memory held now (allocated on CUDA, resident on the CPU) above the start."""
        if self.device.type == "cuda":
            return max(0, int(torch.cuda.memory_allocated(self.device)) - self.start)
        return max(0, (_status_kib("VmRSS") or 0) - self.start)

    def measure(self, fn: Callable[[], object]) -> int | None:
        """Run ``fn`` and return the peak memory it added above what was held when it began
        (``None`` where the peak counter cannot be reset: the process's lifetime peak would
        hide it). The run's own peak (:meth:`peak_above_start`) keeps counting through it."""
        self._carried = self.peak_above_start()
        if self.device.type == "cuda":
            base = int(torch.cuda.memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            return max(0, int(torch.cuda.max_memory_allocated(self.device)) - base)
        if not self.resettable:
            fn()
            return None
        base = _status_kib("VmRSS") or 0
        _reset_peak_rss()
        fn()
        return max(0, (_status_kib("VmHWM") or base) - base)


def start_run(dtype_name: str, device_spec: str, seed: int) -> tuple[torch.dtype, torch.device, torch.Generator]:
    """Dtype, device (peak-memory counter reset on CUDA) and the run's seeded CPU generator;
    starts the run's clock (:func:`~.timeplan.mark_run_start`, for ``lsr.time_limit``)."""
    mark_run_start()
    device = resolve_device(device_spec)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return TORCH_DTYPES[dtype_name], device, torch.Generator().manual_seed(seed)
