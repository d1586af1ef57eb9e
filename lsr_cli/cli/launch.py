"""``--nproc``: the torchrun launch and what every rank of a distributed run does at its end."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from lsr_cli.distributed import Comm, launch_command, launched_by_torchrun
from lsr_cli.errors import ConfigError
from lsr_cli.runtime import MemoryMeter

from .guard import STATUS_ENV, PeerFailed, current_comm

_TORCHRUN_NOISE = re.compile(
    r"^([WEI]\d{4} \d\d:\d\d:\d\d|\*{10,}|Setting OMP_NUM_THREADS|Traceback |  |=+$|\[\d+\]:|"
    r"-{10,}$|torch\.distributed\.|Root Cause|Failures:|<NO_OTHER_FAILURES>|lsr_cli FAILED|.*ChildFailedError)"
)


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``lsr ARGV`` on ``nproc`` local processes through torchrun; returns the exit code.

    Progress, warnings and the error line of the workers pass through; torchrun's own log
    lines and failure summary are dropped (the failing rank already printed its one line)."""
    with tempfile.TemporaryDirectory(prefix="lsr-launch-") as tmp:
        status = Path(tmp) / "status"
        env = {**os.environ, STATUS_ENV: str(status)}
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.Popen(launch_command(nproc, argv), stderr=subprocess.PIPE, env=env, text=True)
        seen: set[str] = set()

        def relay() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                if _TORCHRUN_NOISE.match(line) or line.startswith("error:") and line in seen:
                    continue
                seen.add(line)
                sys.stderr.write(line)
                sys.stderr.flush()

        thread = threading.Thread(target=relay, daemon=True)
        thread.start()
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        thread.join()
        if rc != 0 and status.is_file():
            with contextlib.suppress(ValueError, OSError):
                return int(status.read_text(encoding="ascii").strip())
        return rc


def worker_argv(command: str = "refine", **opts: Any) -> list[str]:
    """``command`` arguments that reproduce the options given (for the workers of ``--nproc``)."""
    checkpoint = opts.pop("checkpoint")
    argv = [command] + ([str(checkpoint)] if checkpoint is not None else [])
    flags = {"as_json": "--json", "max_memory": "--max-memory", "use_compile": "--compile"}
    for key, value in opts.items():
        flag = flags.get(key, "--" + key.replace("_", "-"))
        if value is None or value is False:
            continue
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def finish_on_root(
    comm: Comm,
    meter: MemoryMeter | None,
    t_start: float,
    local_rows: int,
    write: Callable[[list[dict[str, Any]]], None],
) -> None:
    """Gather every rank's rows, memory and time; rank 0 writes the outputs (``write(ranks)``)
    and tells the other ranks whether that worked, so that all of them end the same way."""
    distributed = comm.distributed  # under torchrun, even with one rank
    ranks = comm.allgather_object(_rank_info(comm, meter, t_start, local_rows)) if distributed else []
    if not comm.is_root:
        if not comm.all_ok(True):  # rank 0 failed writing and reports it
            raise PeerFailed()
        return
    try:
        write(ranks)
    except BaseException:
        if distributed:
            comm.all_ok(False)
        raise
    if distributed:
        comm.all_ok(True)


def _rank_info(comm: Comm, meter: MemoryMeter | None, t_start: float, rows: int) -> dict[str, Any]:
    return {
        "rank": comm.rank,
        "local_rank": comm.local_rank,
        "host": socket.gethostname(),
        "device": str(comm.device),
        "rows": rows,
        "peak_memory_above_start_bytes": meter.peak_above_start() if meter is not None else None,
        "peak_memory_kind": meter.kind if meter is not None else None,
        "wall_seconds": time.perf_counter() - t_start,
    }


def distributed_field(comm: Comm, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's ``distributed`` field."""
    return {
        "world_size": comm.world,
        "backend": comm.backend,
        "sharded": "contiguous row slices of every split (PDE: of every block's points) per rank",
        "ranks": ranks,
        "max_peak_memory_above_start_bytes": max((r["peak_memory_above_start_bytes"] or 0 for r in ranks), default=0),
        "max_wall_seconds": max((r["wall_seconds"] for r in ranks), default=0.0),
    }


def check_nproc(nproc: int | None) -> None:
    if nproc is not None:
        if nproc < 1:
            raise ConfigError(f"--nproc: must be at least 1, got {nproc}")
        if launched_by_torchrun():
            raise ConfigError("--nproc: this process was started by torchrun already; drop --nproc")


def finish_worker(comm: Comm) -> None:
    """After a successful command: a torchrun worker waits for every rank, flushes and leaves
    with ``os._exit(0)`` (the outputs are complete; the C++ process-group teardown at interpreter
    exit aborted a rank now and then); one process just returns."""
    if not comm.distributed:
        comm.close()
        return
    comm.close(destroy=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def leave_if_failed_rank(exc: typer.Exit) -> None:
    """A failed rank leaves at once: tearing the process group down (explicitly or at
    interpreter exit) while peers wait in a collective aborts in C++; torchrun ends the peers."""
    if current_comm.pop("failed", None) is not None and exc.exit_code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.exit_code)
