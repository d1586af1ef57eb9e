"""Row-sharded LSR on ``torch.distributed``: the communicator and the distributed linear algebra.

Every rank holds a contiguous slice of the residual rows (:func:`shard_range`); the linearized
parameters, the sketch's ``Ω``, ``B = Jᵀ Q``, the basis ``P`` and the reduced triangles are
replicated. The few places where rows meet are here:

- :func:`orthonormalize` — a thin QR of the distributed ``Y`` by TSQR (local Householder QR,
  all-gather of the small ``R`` factors, QR of their stack, ``Q = Q_local · block``);
- :meth:`Comm.allreduce_sum` — ``Qᵀ Y`` and ``Jᵀ Q`` (sums of the local products);
- :func:`global_norm`, :meth:`Comm.sum_float` — every norm or count used for a decision;
- :func:`merge_accumulators` — the reduced problem's QR triangles, all-gathered and merged
  identically on every rank.

:class:`Comm` itself is the single-process communicator (``world = 1``: every method is the
identity), so the single-process path runs the same code and gives bit-for-bit the same
numbers; :class:`TorchComm` wraps an initialized process group (NCCL on CUDA, Gloo on CPU).
"""

from __future__ import annotations

import os
import pickle
import time
from typing import Any

import torch
from torch import Tensor

from .errors import DeviceError, NumericalError

TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
"""Environment variables every ``torchrun`` worker has; their presence means "distributed"."""

CLOSE_TIMEOUT_S = 60.0
"""How long a finished rank waits for the others before tearing the process group down."""

FAULT_ENV = "LSR_INJECT_FAILURE"
"""``RANK:STAGE`` makes rank ``RANK`` raise at ``STAGE`` (tests of the failure path)."""


class Comm:
    """The single-process communicator: ``rank = 0``, ``world = 1``, every reduction the identity."""

    rank = 0
    world = 1
    local_rank = 0
    backend = "none"
    device = torch.device("cpu")

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether this process runs under ``torch.distributed`` (``torchrun``), even with one rank."""
        return False

    def allreduce_sum(self, t: Tensor) -> Tensor:
        """Sum over ranks of ``t`` (same shape everywhere)."""
        return t

    def allreduce_max(self, t: Tensor) -> Tensor:
        return t

    def allgather(self, t: Tensor) -> list[Tensor]:
        """``t`` of every rank, in rank order (same shape everywhere)."""
        return [t]

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        """Rank ``src``'s ``t`` on every rank."""
        return t

    def allgather_object(self, obj: Any) -> list[Any]:
        """A small picklable object of every rank, in rank order."""
        return [obj]

    def sum_float(self, x: float) -> float:
        return float(x)

    def sum_int(self, x: int) -> int:
        return int(x)

    def all_ok(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (a collective: every rank must call it)."""
        return bool(ok)

    def claim_error_report(self) -> bool:
        """Whether this rank is the one that prints the run's error line (the first to ask)."""
        return True

    def close(self, wait: bool = True, destroy: bool = True) -> None:
        return None


SINGLE = Comm()
"""The single-process communicator (the default everywhere)."""


class TorchComm(Comm):
    """A :class:`Comm` over the default ``torch.distributed`` process group."""

    def __init__(self, rank: int, world: int, local_rank: int, backend: str, device: torch.device) -> None:
        self.rank = rank
        self.world = world
        self.local_rank = local_rank
        self.backend = backend
        self.device = device

    @property
    def distributed(self) -> bool:
        return True

    def _on(self, t: Tensor) -> Tensor:
        return t.detach().to(self.device).contiguous()

    def allreduce_sum(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        x = self._on(t).clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.to(t.device)

    def allreduce_max(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        x = self._on(t).clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return x.to(t.device)

    def allgather(self, t: Tensor) -> list[Tensor]:
        import torch.distributed as dist

        x = self._on(t)
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x)
        return [o.to(t.device) for o in out]

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        import torch.distributed as dist

        x = self._on(t).clone()
        dist.broadcast(x, src)
        return x.to(t.device)

    def allgather_object(self, obj: Any) -> list[Any]:
        # via byte tensors (all_gather_object would need the CUDA device set for NCCL)
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = self.allgather(torch.tensor([data.numel()], dtype=torch.int64))
        top = int(max(int(s) for s in sizes))
        padded = torch.zeros(top, dtype=torch.uint8)
        padded[: data.numel()] = data
        parts = self.allgather(padded)
        return [pickle.loads(p[: int(s)].numpy().tobytes()) for p, s in zip(parts, sizes, strict=True)]

    def sum_float(self, x: float) -> float:
        return float(self.allreduce_sum(torch.tensor([x], dtype=torch.float64))[0])

    def sum_int(self, x: int) -> int:
        return int(self.allreduce_sum(torch.tensor([x], dtype=torch.int64))[0])

    def all_ok(self, ok: bool) -> bool:
        return self.sum_int(0 if ok else 1) == 0

    def claim_error_report(self) -> bool:
        try:
            from torch.distributed import distributed_c10d

            store = distributed_c10d._get_default_store()
            return int(store.add("lsr/error_reported", 1)) == 1
        except Exception:  # no store (not initialized, or the store's host is gone): print
            return True

    def close(self, wait: bool = True, destroy: bool = True) -> None:
        """Destroy the process group; with ``wait``, first until every rank got here (through
        the store, not the backend: tearing Gloo down while a peer still finishes its last
        collective aborts that peer). ``destroy=False`` only waits: a torchrun worker that
        then leaves with ``os._exit`` skips the C++ teardown, which measured here aborted a
        rank now and then ("terminate called without an active exception")."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        if wait:
            try:
                from torch.distributed import distributed_c10d

                store = distributed_c10d._get_default_store()
                store.add("lsr/closing", 1)
                deadline = time.monotonic() + CLOSE_TIMEOUT_S
                while int(store.add("lsr/closing", 0)) < self.world and time.monotonic() < deadline:
                    time.sleep(0.01)
            except Exception:  # the store is gone: nothing left to wait for
                pass
        if destroy:
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """Whether this process is a ``torchrun`` worker (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` set)."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def init_from_env(device_spec: str) -> tuple[Comm, str]:
    """The communicator of a ``torchrun`` worker and the device it should use.

    Backend: NCCL when the run's device is CUDA (``auto`` on a machine with CUDA, ``cuda``,
    ``cuda:N``; each rank takes ``cuda:LOCAL_RANK``), else Gloo. Outside ``torchrun`` returns
    the single-process :data:`SINGLE` and ``device_spec`` unchanged."""
    if not launched_by_torchrun():
        return SINGLE, device_spec
    import torch.distributed as dist

    rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device_spec!r} requested but CUDA is not available on this machine")
        if local >= torch.cuda.device_count():
            raise DeviceError(
                f"torchrun started {local + 1}+ processes on this node but it has only "
                f"{torch.cuda.device_count()} CUDA device(s); lower --nproc-per-node"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend, spec = "nccl", f"cuda:{local}"
    else:
        device, backend, spec = torch.device("cpu"), "gloo", "cpu"
    if not dist.is_initialized():
        if cuda:
            try:
                dist.init_process_group(backend=backend, device_id=device)
            except TypeError:  # torch < 2.3 has no device_id
                dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend)
    return TorchComm(rank, world, local, backend, device), spec


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of rank ``rank``: contiguous, sizes differing by at most one."""
    base, extra = divmod(int(n), int(world))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def local_rows(rows: Tensor, start: int, end: int) -> Tensor:
    """The global row indices ``rows`` that fall in ``[start, end)``, shifted to local indices (order kept)."""
    keep = (rows >= start) & (rows < end)
    return rows[keep] - start


def global_norm(t: Tensor, comm: Comm) -> float:
    """‖t‖₂ over the rows of every rank (``torch.linalg.norm`` itself on one rank)."""
    if comm.world == 1:
        return float(torch.linalg.norm(t))
    sq = comm.allreduce_sum(torch.sum(t.to(torch.float64) ** 2).reshape(1))
    return float(torch.sqrt(sq)[0])


def global_mean_square(t: Tensor, comm: Comm) -> float:
    """Mean of ``t²`` over the rows of every rank."""
    if comm.world == 1:
        return float(torch.mean(t**2))
    s = comm.allreduce_sum(torch.tensor([float(torch.sum(t.to(torch.float64) ** 2)), t.numel()], dtype=torch.float64))
    return float(s[0] / s[1]) if s[1] > 0 else float("nan")


def orthonormalize(Y: Tensor, comm: Comm) -> Tensor:
    """The local rows of an orthonormal basis ``Q`` of the distributed ``Y`` (thin QR).

    TSQR: ``Y_i = Q_i R_i`` locally; the ``R_i`` (``k × k``) are all-gathered and stacked;
    ``[R_0; …] = Q' R``; the local rows of ``Q`` are ``Q_i · Q'[i-th block]``. When some rank
    has fewer rows than columns, ``Y`` is gathered whole instead (then it is small)."""
    if comm.world == 1:
        return torch.linalg.qr(Y, mode="reduced").Q
    n_loc, k = int(Y.shape[0]), int(Y.shape[1])
    sizes = [int(s) for s in comm.allgather(torch.tensor([n_loc], dtype=torch.int64))]
    if min(sizes) < k:
        top = max(sizes)
        padded = Y.new_zeros(top, k)
        padded[:n_loc] = Y
        parts = comm.allgather(padded)
        full = torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])
        Q = torch.linalg.qr(full, mode="reduced").Q
        start = sum(sizes[: comm.rank])
        return Q[start : start + n_loc].contiguous()
    Q1, R1 = torch.linalg.qr(Y, mode="reduced")
    stacked = torch.cat(comm.allgather(R1))
    Q2 = torch.linalg.qr(stacked, mode="reduced").Q
    return Q1 @ Q2[comm.rank * k : (comm.rank + 1) * k]


def merge_accumulators(acc: Any, comm: Comm) -> Any:
    """A :class:`~.solve.QRAccumulator` of every rank's rows: the ``(r+1) × (r+1)`` triangles are
    all-gathered (zero-padded) and merged in rank order, identically on every rank."""
    if comm.world == 1:
        return acc
    from .solve import QRAccumulator

    size = acc.r + 1
    R = acc.R_aug
    if R.shape[0] < size:
        R = torch.cat([R, R.new_zeros(size - R.shape[0], size)])
    triangles = comm.allgather(R)
    counts = comm.allgather(torch.tensor([acc.n], dtype=torch.int64))
    out = QRAccumulator(acc.r, R.device)
    for tri, count in zip(triangles, counts, strict=True):
        part = QRAccumulator(acc.r, R.device)
        part.R_aug, part.n = tri, int(count)
        out = out.merge(part)
    return out


def fault_point(stage: str, comm: Comm) -> None:
    """Raise when ``LSR_INJECT_FAILURE`` is ``RANK:STAGE`` for this rank (tests of the failure path)."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{comm.rank}:{stage}":
        raise NumericalError(f"injected failure at stage '{stage}' ({FAULT_ENV}={spec})")


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m lsr_cli ARGV``."""
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={int(nproc)}",
        "-m",
        "lsr_cli",
        *argv,
    ]


__all__ = [
    "SINGLE",
    "Comm",
    "TorchComm",
    "fault_point",
    "global_mean_square",
    "global_norm",
    "init_from_env",
    "launch_command",
    "launched_by_torchrun",
    "local_rows",
    "merge_accumulators",
    "orthonormalize",
    "shard_range",
]
