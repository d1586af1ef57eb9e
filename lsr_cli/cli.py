"""The ``lsr`` command line (Typer). The only module that turns errors into exit codes.

Every :class:`~lsr_cli.errors.LsrError` becomes one line on stderr and its exit code; an
unexpected exception is a bug: one line and exit code 1, or the full traceback with
``--debug``. Outputs are written only when everything succeeded, atomically.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .budget import limit_allocator_slack
from .checkpoint import LoadedCheckpoint, load_checkpoint, refined_suffix, resolve_output_format, save_refined
from .config import (
    Config,
    load_config,
    parse_device,
    parse_dtype,
    parse_duration,
    parse_memory,
    parse_output_format,
    parse_rank,
)
from .data import LazyArray, read_data
from .distributed import SINGLE, Comm, fault_point, init_from_env, launch_command, launched_by_torchrun
from .errors import EXIT_CODES, CheckpointError, ConfigError, DataError, LsrError, OutputError
from .iterate_supervised import iterate_supervised
from .outputs import atomic_outputs, check_output_path
from .pde import PdeProblem, parse_problem, refine_pde
from .pde.instances import fingerprint, parse_instances, run_instances
from .pde.iterate import IterateResult, iterate
from .refine import RefineResult, evaluate, refine
from .report import (
    NETWORK_NOTE,
    clean_json,
    errors_table,
    instances_report,
    instances_table,
    iterate_table,
    output_console,
    progress_sink,
    refine_report,
    refine_summary,
    refine_table,
    versions,
    write_json,
)
from .runtime import (
    TORCH_DTYPES,
    MemoryMeter,
    cast_module,
    cast_tensor,
    resolve_device,
    resolve_memory_budget,
    warm_up_autodiff,
)

app = typer.Typer(
    name="lsr",
    help="Linearized Subspace Refinement: make a trained network more accurate.\n\n"
    "Which command: `refine` for a more accurate predictor of a regressor, operator network or PINN; "
    "`iterate` for a more accurate plain network of a PINN; `instances` to refine an operator network "
    "per input function; `evaluate`, `inspect` and `report` to look at checkpoints and reports.",
    epilog="Exit codes: 0 success, 1 internal error, 2 config/usage, 3 data, 4 checkpoint, 5 numerical, "
    "6 output exists / not writable, 7 device not available. Config keys: docs/configuration.md.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
)

_err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lsr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Exit codes: 0 success, 1 internal error, 2 config/usage, 3 data, 4 checkpoint,
    5 numerical, 6 output exists / not writable, 7 device not available."""


STATUS_ENV = "LSR_STATUS_FILE"
"""Set by ``lsr refine --nproc``: the rank that reports the error writes its exit code there."""

_comm: dict[str, Comm] = {"comm": SINGLE}  # the running command's communicator (set under torchrun)


def _reports_errors() -> bool:
    """Whether this process prints the error line: always on one process; under ``torchrun``
    only the first rank that fails (ranks agree through the process group's store), or rank 0
    before the process group exists (errors there are the same on every rank)."""
    comm = _comm["comm"]
    if comm.distributed:
        return comm.claim_error_report()
    if launched_by_torchrun():
        return os.environ.get("RANK", "0") == "0"
    return True


def _fail(message: str, code: int) -> typer.Exit:
    comm = _comm["comm"]
    if not _reports_errors():
        return typer.Exit(code)
    if comm.world > 1:
        message = f"rank {comm.rank} of {comm.world}: {message}"
    _err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    status = os.environ.get(STATUS_ENV)
    if status:
        with contextlib.suppress(OSError):
            Path(status).write_text(str(code), encoding="ascii")
    return typer.Exit(code)


def _single_process_only(command: str) -> None:
    """``instances`` does not run distributed yet: refuse under torchrun with several ranks."""
    if launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"lsr {command} does not run on several processes yet (only `lsr refine` and `lsr iterate` do); "
            "run it without torchrun"
        )


class _PeerFailed(Exception):
    """Another rank failed (it reported the error); this one exits without a message."""


@contextlib.contextmanager
def _guard(debug: bool):
    """Map errors to one line + exit code (tracebacks only with ``--debug``)."""
    try:
        yield
    except typer.Exit:
        raise
    except _PeerFailed:
        raise typer.Exit(1) from None
    except LsrError as exc:
        if debug:
            raise
        raise _fail(str(exc), exc.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; nothing was written", 130) from None
    except Exception as exc:  # a bug
        if debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _fail(f"internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)", 1) from None


def _warn(messages: list[str], quiet: bool) -> None:
    if not quiet:
        for m in messages:
            _err.print(f"[yellow]warning:[/] {escape(m)}", highlight=False, soft_wrap=True)


def _print_results(
    table: Table, summary: str, out_path: Path, report_path: Path, html: Path | None, note: str | None = None
) -> None:
    """The table (and a note on it), the closing line and the files written, on stdout (see
    :func:`output_console`)."""
    console = output_console()
    console.print(table)
    if note is not None:
        console.print(escape(note), highlight=False)
    console.print(escape(f"{summary}\nwrote {out_path} and {report_path}"), highlight=False)
    if html is not None:
        console.print(escape(f"plots: {html}"), highlight=False)


def _config(path: Path | None) -> tuple[Config, Path | None]:
    cfg = load_config(path)
    return cfg, (path.resolve().parent if path is not None else None)


def _data_path(flag: Path | None, cfg: Config, base: Path | None) -> Path:
    if flag is not None:
        return flag
    if cfg.data.path:
        p = Path(cfg.data.path)
        return p if p.is_absolute() or base is None else base / p
    raise ConfigError("no data: pass --data FILE or set data.path in the config")


def _optional_data_path(flag: Path | None, cfg: Config, base: Path | None) -> Path | None:
    """PDE problems may generate every point: the data file is then optional."""
    if flag is None and not cfg.data.path:
        return None
    return _data_path(flag, cfg, base)


def _problem_info(problem: PdeProblem) -> dict[str, Any]:
    return {
        "equation": problem.equation_name,
        "variables": problem.variables,
        "blocks": {
            b.name: {
                "kind": b.kind,
                "num_points": int(b.points.shape[0]),
                "weight": b.weight,
                "points": b.spec.get("points"),
            }
            for b in problem.blocks
        },
        "reference_points": int(problem.reference[0].shape[0]) if problem.reference is not None else 0,
    }


def _output_paths(
    out: Path | None, report: Path | None, cfg: Config, base: Path | None, default: Path
) -> tuple[Path, Path]:
    """Output and report paths: flag, else config (relative to it), else beside the input."""
    out_path = out or _relative(cfg.output.checkpoint, base) or default
    return out_path, report or _relative(cfg.output.report, base) or out_path.with_name(out_path.stem + ".report.json")


def _relative(value: str | None, base: Path | None) -> Path | None:
    if value is None:
        return None
    p = Path(value)
    return p if p.is_absolute() or base is None else base / p


def _apply_overrides(
    cfg: Config,
    *,
    device: str | None,
    dtype: str | None,
    seed: int | None,
    rank: str | None,
    max_memory: str | None = None,
    use_compile: bool = False,
    time_limit: str | None = None,
) -> None:
    if use_compile:
        cfg.lsr.compile = "inductor"
    if device is not None:
        cfg.device = parse_device("device (--device)", device)
    if dtype is not None:
        cfg.dtype = parse_dtype("dtype (--dtype)", dtype)
    if seed is not None:
        if seed < 0:
            raise ConfigError(f"--seed: must be at least 0, got {seed}")
        cfg.seed = seed
    if rank is not None:
        cfg.lsr.rank = parse_rank("lsr.rank (--rank)", rank)
    if max_memory is not None:
        cfg.lsr.max_memory = parse_memory("lsr.max_memory (--max-memory)", max_memory)
    if time_limit is not None:
        cfg.lsr.time_limit = parse_duration("lsr.time_limit (--time-limit)", time_limit)


def _split_info(data: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {
            "group": s.group,
            "num_samples": s.num_global,
            "inputs": s.input_names,
            **(
                {"shared_inputs": [n for n, sh in zip(s.input_names, s.shared, strict=True) if sh]}
                if any(s.shared)
                else {}
            ),
            "streamed": any(isinstance(x, LazyArray) for x in s.inputs),
            **({"selection": s.selection} if s.selection else {}),
        }
        for name, s in data.items()
    }


def _save_refined(
    out: Path,
    ckpt: LoadedCheckpoint,
    result: RefineResult,
    metadata: dict[str, Any],
    num_inputs: int,
    fmt: str | None = None,
    source: Any = None,
) -> dict[str, Any]:
    """Write the refined checkpoint in ``fmt`` (default: the input's family) to ``out``; returns
    the report's output fields (``format``, and for ``export`` the dynamic batch dimensions)."""
    fmt = resolve_output_format(fmt, ckpt)
    if isinstance(source, PdeProblem):
        inputs: tuple[Any, ...] = (source.all_points(),)
        shared: tuple[bool, ...] = ()
    elif isinstance(source, dict) and "train" in source:
        inputs, shared = tuple(source["train"].inputs), tuple(source["train"].shared)
    else:
        inputs, shared = tuple(None for _ in range(num_inputs)), ()
    base = result.model.base.to("cpu")
    delta = {k: v.to("cpu") for k, v in result.delta.items()}
    return save_refined(out, fmt, ckpt, base, delta, TORCH_DTYPES[result.dtype], metadata, inputs, shared)


Option = typer.Option


def _write_plots(plots: Path, payload: dict[str, Any], fields: list[Any] | None = None) -> Path:
    """PNGs and ``index.html`` for a report into ``plots``; returns the HTML path."""
    from .plots import write_html, write_plots

    images = write_plots(payload, plots, fields)
    html = plots / "index.html"
    write_html(payload, html, images)
    return html


def _check_plots(plots: Path | None, inputs: list[Path]) -> None:
    """Before any work: matplotlib is importable and the folder can be made."""
    if plots is None:
        return
    from .plots import require_matplotlib

    require_matplotlib()
    if plots.exists() and not plots.is_dir():
        raise OutputError(f"{plots}: --plots needs a folder, found a file")
    for src in inputs:
        if plots.resolve() == src.resolve():
            raise OutputError(f"{plots}: --plots would overwrite the input {src}")


def _reference_fields(model: Any, problem: PdeProblem) -> list[Any]:
    """Pointwise errors vs ``/reference`` for 1-D/2-D problems (error-field plots)."""
    import numpy as np

    from .plots import FieldData

    if problem.reference is None or problem.reference[0].shape[1] not in (1, 2):
        return []
    x, u = problem.reference
    with torch.no_grad():
        x = x.to(model.dtype)
        before = model.base(x).reshape(-1)
        after = model(x).reshape(-1)
    y = u.to(model.dtype).reshape(-1)
    return [
        FieldData(
            "reference",
            x.double().cpu().numpy(),
            np.abs((before - y).double().cpu().numpy()),
            np.abs((after - y).double().cpu().numpy()),
        )
    ]


def _error_fields(model: Any, splits: dict[str, Any], names: tuple[str, ...] = ("test", "val", "train")) -> list[Any]:
    """Pointwise errors before/after for the first split (test, else val, else train) with one
    1-D or 2-D input: the data for the error-field plots."""
    import numpy as np

    from .plots import FieldData

    for name in names:
        s = splits.get(name)
        if s is None or len(s.inputs) != 1 or not isinstance(s.inputs[0], torch.Tensor):
            continue
        x = s.inputs[0]
        if x.ndim != 2 or x.shape[1] not in (1, 2) or not x.is_floating_point():
            continue
        with torch.no_grad():
            dtype = model.dtype
            before = model.base(x.to(dtype)).reshape(x.shape[0], -1)
            after = model(x).reshape(x.shape[0], -1)
        y = s.targets.to(dtype).reshape(x.shape[0], -1)
        e_before = torch.linalg.norm(before - y, dim=1).double().cpu().numpy()
        e_after = torch.linalg.norm(after - y, dim=1).double().cpu().numpy()
        return [FieldData(name, np.asarray(x.double().cpu().numpy()), e_before, e_after)]
    return []


INPUTS, LSR, RUNTIME, OUTPUT = "Inputs", "LSR", "Runtime", "Output"
"""The panels that ``--help`` groups the options in."""

DataOpt = Annotated[
    Path | None, Option("--data", "-d", help="HDF5 data file (overrides data.path).", rich_help_panel=INPUTS)
]
ReportOpt = Annotated[
    Path | None, Option("--report", "-r", help="JSON report (default: OUT.report.json).", rich_help_panel=OUTPUT)
]
RankOpt = Annotated[
    str | None,
    Option("--rank", help="'auto', N, or a sweep 'N1,N2,...' (overrides lsr.rank).", rich_help_panel=LSR),
]
DeviceOpt = Annotated[str | None, Option("--device", help="auto | cpu | cuda | cuda:N.", rich_help_panel=RUNTIME)]
PlotsOpt = Annotated[
    Path | None,
    Option(
        "--plots",
        help="Write PNG plots and an HTML page (index.html) into this folder (needs matplotlib).",
        rich_help_panel=OUTPUT,
    ),
]
MemoryOpt = Annotated[
    str | None,
    Option(
        "--max-memory",
        help="Memory budget, e.g. 2GB or 512MiB (overrides lsr.max_memory; default: half of the free memory). "
        "Inputs larger than a quarter of it are streamed from the HDF5 file.",
        rich_help_panel=RUNTIME,
    ),
]
TimeLimitOpt = Annotated[
    str | None,
    Option(
        "--time-limit",
        help="Wall-time budget, e.g. 10min, 600s or 1.5h (sets lsr.time_limit): the rank plan is cut to what the "
        "measured cost per column says fits; the report gives the estimate beside the measured time.",
        rich_help_panel=RUNTIME,
    ),
]
DtypeOpt = Annotated[str | None, Option("--dtype", help="float64 (default) | float32 (fast).", rich_help_panel=RUNTIME)]
CompileOpt = Annotated[
    bool,
    Option(
        "--compile",
        help="Run the matrix-free JVPs through torch.compile (inductor; plain modules only; sets lsr.compile). "
        "Pays off on long matrix-free runs; compiling takes seconds to a minute.",
        rich_help_panel=RUNTIME,
    ),
]
SeedOpt = Annotated[int | None, Option("--seed", help="Seed of every random draw.", rich_help_panel=LSR)]
ForceOpt = Annotated[bool, Option("--force", help="Overwrite existing outputs.", rich_help_panel=OUTPUT)]
QuietOpt = Annotated[bool, Option("--quiet", "-q", help="No progress, table or warnings.", rich_help_panel=OUTPUT)]
JsonOpt = Annotated[
    bool, Option("--json", help="Print the report as JSON on stdout and nothing else.", rich_help_panel=OUTPUT)
]
VerboseOpt = Annotated[
    bool,
    Option(
        "--verbose",
        "-v",
        help="Add max |err| and the plain network at θ0 + δ (not the refined model) to the table.",
        rich_help_panel=OUTPUT,
    ),
]
DebugOpt = Annotated[bool, Option("--debug", help="Show tracebacks of unexpected errors.", rich_help_panel=RUNTIME)]
NprocOpt = Annotated[
    int | None,
    Option(
        "--nproc",
        help="Run on N processes of this machine (torchrun --standalone; NCCL on CUDA, one GPU each; Gloo on CPU). "
        "For several machines call torchrun yourself: docs/distributed.md.",
        rich_help_panel=RUNTIME,
    ),
]

_TORCHRUN_NOISE = re.compile(
    r"^([WEI]\d{4} \d\d:\d\d:\d\d|\*{10,}|Setting OMP_NUM_THREADS|Traceback |  |=+$|\[\d+\]:|"
    r"-{10,}$|torch\.distributed\.|Root Cause|Failures:|<NO_OTHER_FAILURES>|lsr_cli FAILED|.*ChildFailedError)"
)


def _launch(nproc: int, argv: list[str]) -> int:
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


def _refine_argv(command: str = "refine", **opts: Any) -> list[str]:
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


def _finish_on_root(
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
            raise _PeerFailed()
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


def _distributed_field(comm: Comm, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's ``distributed`` field."""
    return {
        "world_size": comm.world,
        "backend": comm.backend,
        "sharded": "contiguous row slices of every split (PDE: of every block's points) per rank",
        "ranks": ranks,
        "max_peak_memory_above_start_bytes": max((r["peak_memory_above_start_bytes"] or 0 for r in ranks), default=0),
        "max_wall_seconds": max((r["wall_seconds"] for r in ranks), default=0.0),
    }


def _check_nproc(nproc: int | None) -> None:
    if nproc is not None:
        if nproc < 1:
            raise ConfigError(f"--nproc: must be at least 1, got {nproc}")
        if launched_by_torchrun():
            raise ConfigError("--nproc: this process was started by torchrun already; drop --nproc")


def _finish_worker(comm: Comm) -> None:
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


def _leave_if_failed_rank(exc: typer.Exit) -> None:
    """A failed rank leaves at once: tearing the process group down (explicitly or at
    interpreter exit) while peers wait in a collective aborts in C++; torchrun ends the peers."""
    if _comm.pop("failed", None) is not None and exc.exit_code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.exit_code)


REFINE_EXAMPLES = """\
Examples (from the repository root):

# a regressor: the sample MLP on its HDF5 data
lsr refine sample_data/regression_torchscript.pt \\
    --config configs/regression.yaml --out runs/regression.refined.pt
# a PINN: the physics residual of the config's `pde:` section
lsr refine sample_data/poisson2d_torchscript.pt \\
    --config configs/poisson2d.yaml --out runs/poisson.refined.pt
# a rank sweep; the report as JSON on stdout, for scripts
lsr refine sample_data/regression_state_dict.pt \\
    --config configs/regression.yaml --rank 64,256 --out runs/sweep.pt --json
"""


@app.command("refine", epilog=REFINE_EXAMPLES)
def refine_cmd(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="torch.export (.pt2), TorchScript, safetensors or state-dict checkpoint (or a refined one)."
        ),
    ],
    data: DataOpt = None,
    config: Annotated[Path | None, Option("--config", "-c", help="YAML config file.", rich_help_panel=INPUTS)] = None,
    rank: RankOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    max_memory: MemoryOpt = None,
    time_limit: TimeLimitOpt = None,
    use_compile: CompileOpt = False,
    nproc: NprocOpt = None,
    debug: DebugOpt = False,
    out: Annotated[
        Path | None,
        Option("--out", "-o", help="Refined checkpoint (default: CHECKPOINT.refined.pt).", rich_help_panel=OUTPUT),
    ] = None,
    report: ReportOpt = None,
    plots: PlotsOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
    out_format: Annotated[
        str | None,
        Option(
            "--format",
            help="Refined checkpoint format: torchscript | export (.pt2) | state-dict | safetensors (default: the "
            "input's; sets output.format).",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    trust_checkpoint: Annotated[
        bool,
        Option(
            "--trust-checkpoint",
            help="Unpickle the checkpoint without restriction (files you trust only; sets model.trust_checkpoint).",
            rich_help_panel=INPUTS,
        ),
    ] = False,
) -> None:
    """One-shot LSR of CHECKPOINT on training data or a PDE residual.

    Fits the training split of the HDF5 data, or the physics residual of a config's `pde:` section.

    Writes the refined checkpoint and a JSON report."""
    t_start = time.perf_counter()
    try:
        _refine_cmd(
            checkpoint,
            data,
            config,
            out,
            report,
            rank,
            device,
            dtype,
            seed,
            max_memory,
            use_compile,
            plots,
            force,
            quiet,
            as_json,
            debug,
            nproc,
            t_start,
            verbose=verbose,
            out_format=out_format,
            trust_checkpoint=trust_checkpoint,
            time_limit=time_limit,
        )
    except typer.Exit as exc:
        _leave_if_failed_rank(exc)
        raise
    finally:
        _comm["comm"] = SINGLE


def _refine_cmd(
    checkpoint: Path,
    data: Path | None,
    config: Path | None,
    out: Path | None,
    report: Path | None,
    rank: str | None,
    device: str | None,
    dtype: str | None,
    seed: int | None,
    max_memory: str | None,
    use_compile: bool,
    plots: Path | None,
    force: bool,
    quiet: bool,
    as_json: bool,
    debug: bool,
    nproc: int | None,
    t_start: float,
    *,
    verbose: bool = False,
    out_format: str | None = None,
    trust_checkpoint: bool = False,
    time_limit: str | None = None,
) -> None:
    with _guard(debug):
        _check_nproc(nproc)
        if nproc is not None and nproc > 1:
            argv = _refine_argv(
                checkpoint=checkpoint,
                data=data,
                config=config,
                out=out,
                report=report,
                rank=rank,
                device=device,
                dtype=dtype,
                seed=seed,
                max_memory=max_memory,
                use_compile=use_compile,
                plots=plots,
                force=force,
                quiet=quiet,
                as_json=as_json,
                verbose=verbose,
                debug=debug,
                format=out_format,
                trust_checkpoint=trust_checkpoint,
                time_limit=time_limit,
            )
            code = _launch(nproc, argv)
            if code != 0:
                raise typer.Exit(code)
            return
        cfg, base = _config(config)
        _apply_overrides(
            cfg,
            device=device,
            dtype=dtype,
            seed=seed,
            rank=rank,
            max_memory=max_memory,
            use_compile=use_compile,
            time_limit=time_limit,
        )
        if out_format is not None:
            cfg.output.format = parse_output_format("output.format (--format)", out_format)
        if trust_checkpoint:
            cfg.model.trust_checkpoint = True
        comm, cfg.device = init_from_env(cfg.device)
        _comm["comm"] = comm
        try:
            _refine_run(
                checkpoint, data, config, out, report, plots, force, quiet, as_json, cfg, base, comm, t_start, verbose
            )
        except BaseException:
            if comm.distributed:
                _comm["failed"] = comm
            raise
        else:
            _finish_worker(comm)


def _refine_run(
    checkpoint: Path,
    data: Path | None,
    config: Path | None,
    out: Path | None,
    report: Path | None,
    plots: Path | None,
    force: bool,
    quiet: bool,
    as_json: bool,
    cfg: Config,
    base: Path | None,
    comm: Comm,
    t_start: float,
    verbose: bool = False,
) -> None:
    """The body of ``lsr refine`` on one process or one rank of a distributed run.

    Distributed: every rank reads its share of the rows and takes part in the refinement;
    rank 0 alone prints and writes. After rank 0 has written, every rank learns whether it
    succeeded, so a failure ends every rank with a non-zero exit code."""
    root = comm.is_root
    pde_mode = cfg.pde is not None
    data_path = _optional_data_path(data, cfg, base) if pde_mode else _data_path(data, cfg, base)
    resolve_device(cfg.device)
    out_path, report_path = _output_paths(
        out, report, cfg, base, checkpoint.with_name(checkpoint.stem + refined_suffix(checkpoint, cfg.output.format))
    )
    inputs = [checkpoint] + ([data_path] if data_path else []) + ([config] if config else [])
    if root:
        check_output_path(out_path, inputs, force, "refined checkpoint")
        check_output_path(report_path, inputs + [out_path], force, "report")
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint file not found")
    if root:
        _check_plots(plots, inputs)

    t0 = time.perf_counter()
    if cfg.lsr.max_memory != "auto":  # a budget the user set: freed blocks go back to the system at once
        limit_allocator_slack()
    ckpt = load_checkpoint(checkpoint, cfg.model, base)
    cfg.output.format = resolve_output_format(cfg.output.format, ckpt)  # checked before any work
    meter: MemoryMeter | None = None
    run_device = resolve_device(cfg.device)
    if pde_mode:
        warm_up_autodiff(run_device)
        meter = MemoryMeter(run_device)  # counts the points read below
        problem = parse_problem(cfg.pde, data_path, torch.Generator().manual_seed(cfg.seed), base)
        data_info: dict[str, Any] = {"path": str(data_path) if data_path else None, **_problem_info(problem)}
        problem.shard(comm.rank, comm.world)
        num_inputs = 1
        local_rows = sum(int(b.points.shape[0]) for b in problem.blocks)
    else:
        assert data_path is not None
        budget = resolve_memory_budget(cfg.lsr.max_memory, run_device)
        warm_up_autodiff(run_device)
        meter = MemoryMeter(run_device)  # counts the data read below
        shard = (comm.rank, comm.world) if comm.world > 1 else None
        splits = read_data(data_path, cfg.data, TORCH_DTYPES[cfg.dtype], lazy_above=budget // 4, shard=shard)
        data_info = {"path": str(data_path), "splits": _split_info(splits)}
        num_inputs = len(splits["train"].inputs)
        local_rows = splits["train"].num_samples
    fault_point("load", comm)
    t_load = time.perf_counter() - t0
    _warn(ckpt.warnings, quiet or as_json or not root)
    show = not (quiet or as_json) and root
    with progress_sink(_err, enabled=show) as progress:
        result = (
            refine_pde(ckpt, problem, cfg, progress, comm, meter)
            if pde_mode
            else refine(ckpt, splits, cfg, progress, meter, comm)
        )
    _warn(result.warnings, quiet or as_json or not root)

    def write(ranks: list[dict[str, Any]]) -> None:
        _write_refine_outputs(
            checkpoint,
            out_path,
            report_path,
            plots,
            quiet,
            as_json,
            cfg,
            comm,
            t_start,
            t1=time.perf_counter(),
            t_load=t_load,
            ckpt=ckpt,
            result=result,
            data_info=data_info,
            num_inputs=num_inputs,
            ranks=ranks,
            fields_source=(problem if pde_mode else splits),
            verbose=verbose,
        )

    _finish_on_root(comm, meter, t_start, local_rows, write)


def _write_refine_outputs(
    checkpoint: Path,
    out_path: Path,
    report_path: Path,
    plots: Path | None,
    quiet: bool,
    as_json: bool,
    cfg: Config,
    comm: Comm,
    t_start: float,
    *,
    t1: float,
    t_load: float,
    ckpt: LoadedCheckpoint,
    result: RefineResult,
    data_info: dict[str, Any],
    num_inputs: int,
    ranks: list[dict[str, Any]],
    fields_source: Any,
    verbose: bool = False,
) -> None:
    """Rank 0 (or the only process): the refined checkpoint and the report, atomically; plots; the table."""
    metadata = {
        "lsr_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": str(checkpoint),
        "source_format": ckpt.format,
        "rank": result.rank,
        "dtype": result.dtype,
        "refined_again": ckpt.is_refined,
        **({"unknowns": {k: v["after"] for k, v in result.unknowns.items()}} if result.unknowns else {}),
    }
    timings = {"load": t_load, **result.timings}
    with atomic_outputs(out_path, report_path) as (tmp_out, tmp_report):
        out_info = _save_refined(tmp_out, ckpt, result, metadata, num_inputs, cfg.output.format, fields_source)
        _warn([out_info["warning"]] if "warning" in out_info else [], quiet or as_json)
        timings["save"] = time.perf_counter() - t1
        timings["total"] = time.perf_counter() - t_start
        payload = refine_report(
            result,
            input_info={
                "checkpoint": str(checkpoint),
                "format": ckpt.format,
                "refined_again": ckpt.is_refined,
                "what_was_refined": (
                    "the linearized predictor of a refined checkpoint: its δ was extended at the same θ0"
                    if ckpt.is_refined
                    else "the network at its trained weights θ0"
                ),
                **({"warnings": ckpt.warnings} if ckpt.warnings else {}),
            },
            output_info={"checkpoint": str(out_path), **out_info, "report": str(report_path)},
            data_info=data_info,
            config=cfg.to_dict(),
            timings=timings,
            seed=cfg.seed,
        )
        if comm.distributed:
            payload["distributed"] = _distributed_field(comm, ranks)
        write_json(tmp_report, payload)
    html = None
    if plots is not None:
        fields: list[Any] = []
        if comm.world == 1:  # the error-field plots need every row on one process
            if isinstance(fields_source, PdeProblem):
                fields = _reference_fields(result.model, fields_source)
            else:
                fields = _error_fields(result.model, fields_source)
        html = _write_plots(plots, payload, fields)
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    elif not quiet:
        note = NETWORK_NOTE if verbose else None
        _print_results(refine_table(payload, verbose), refine_summary(payload), out_path, report_path, html, note)


EVALUATE_EXAMPLES = """\
Examples (from the repository root):

lsr evaluate sample_data/regression_torchscript.pt \\
    --config configs/regression.yaml
# the output of `lsr refine`'s first example, as JSON
lsr evaluate runs/regression.refined.pt \\
    --config configs/regression.yaml --json
"""


@app.command("evaluate", epilog=EVALUATE_EXAMPLES)
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Any checkpoint, refined or not.")],
    data: DataOpt = None,
    config: Annotated[
        Path | None,
        Option("--config", "-c", help="YAML config (model factory, data layout).", rich_help_panel=INPUTS),
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    debug: DebugOpt = False,
    as_json: Annotated[
        bool,
        Option("--json", help="Print the errors as JSON on stdout and nothing else.", rich_help_panel=OUTPUT),
    ] = False,
) -> None:
    """Errors of CHECKPOINT on every split (rel L2, RMSE, max |err|)."""
    with _guard(debug):
        cfg, base = _config(config)
        _apply_overrides(cfg, device=device, dtype=dtype, seed=None, rank=None)
        data_path = _data_path(data, cfg, base)
        ckpt = load_checkpoint(checkpoint, cfg.model, base)
        splits = read_data(data_path, cfg.data, TORCH_DTYPES[cfg.dtype])
        errors = evaluate(ckpt, splits, cfg.dtype, cfg.device)
        payload = {
            "command": "evaluate",
            "checkpoint": str(checkpoint),
            "format": ckpt.format,
            "data": str(data_path),
            "dtype": cfg.dtype,
            "splits": errors,
            "versions": versions(),
        }
        if as_json:
            sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        else:
            _warn(ckpt.warnings, False)
            output_console().print(errors_table(escape(f"{checkpoint} ({ckpt.format})"), errors))


INSPECT_EXAMPLES = """\
Examples (from the repository root):

lsr inspect sample_data/regression_torchscript.pt
# a state dict needs the model factory of its config
lsr inspect sample_data/darcy_fno_state_dict.pt \\
    --config configs/darcy_fno.yaml
"""


@app.command("inspect", epilog=INSPECT_EXAMPLES)
def inspect_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Any checkpoint, refined or not.")],
    config: Annotated[
        Path | None,
        Option("--config", "-c", help="YAML config (model factory for state dicts).", rich_help_panel=INPUTS),
    ] = None,
    debug: DebugOpt = False,
    as_json: Annotated[
        bool, Option("--json", help="Print as JSON on stdout and nothing else.", rich_help_panel=OUTPUT)
    ] = False,
) -> None:
    """Format, parameter count and shapes, dtypes of CHECKPOINT."""
    with _guard(debug):
        cfg, base = _config(config)
        ckpt = load_checkpoint(checkpoint, cfg.model, base)
        params = [(n, tuple(p.shape), str(p.dtype).replace("torch.", "")) for n, p in ckpt.module.named_parameters()]
        buffers = [(n, tuple(b.shape), str(b.dtype).replace("torch.", "")) for n, b in ckpt.module.named_buffers()]
        info: dict[str, Any] = {
            "checkpoint": str(checkpoint),
            "format": ckpt.format,
            "num_parameters": sum(p.numel() for p in ckpt.module.parameters()),
            "dtypes": sorted({d for _, _, d in params}),
            "parameters": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in params],
            "buffers": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in buffers],
            "num_inputs": ckpt.num_inputs,
            "model": ckpt.model_spec,
            "refined": ckpt.is_refined,
            "metadata": ckpt.metadata,
        }
        if ckpt.delta is not None:
            info["delta_norm"] = float(
                torch.linalg.norm(
                    torch.cat(
                        [
                            (torch.view_as_real(d) if d.is_complex() else d).double().reshape(-1)
                            for d in ckpt.delta.values()
                        ]
                    )
                )
            )
        if as_json:
            sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
            return
        _warn(ckpt.warnings, False)
        con = output_console()
        con.print(
            f"[bold]{escape(str(checkpoint))}[/]: {ckpt.format}, {info['num_parameters']:,} parameters "
            f"({', '.join(info['dtypes'])})"
            + (f", refined (‖δ‖ = {info['delta_norm']:.3e})" if ckpt.is_refined else ""),
            highlight=False,
        )
        table = Table("parameter", "shape", "dtype")
        for n, s, d in params:
            table.add_row(n, str(list(s)), d)
        con.print(table)


REPORT_EXAMPLES = """\
Examples (from the repository root):

# the report that `lsr refine`'s first example wrote
lsr report runs/regression.refined.report.json --html runs/regression.html
"""


@app.command("report", epilog=REPORT_EXAMPLES)
def report_cmd(
    report: Annotated[Path, typer.Argument(help="A JSON report of lsr refine, iterate or instances.")],
    html: Annotated[
        Path, Option("--html", help="HTML page to write (PNGs go in a folder beside it).", rich_help_panel=OUTPUT)
    ],
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Plots and an HTML page from a saved report (needs matplotlib)."""
    with _guard(debug):
        from .plots import write_html, write_plots

        check_output_path(html, [report], force, "HTML page")
        _check_plots(html.with_suffix(""), [report])
        if not report.is_file():
            raise ConfigError(f"{report}: report file not found")
        try:
            payload = json.loads(report.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{report}: not a JSON report ({exc})") from None
        if not isinstance(payload, dict) or "command" not in payload:
            raise ConfigError(f"{report}: not an lsr report (no 'command' field)")
        folder = html.with_name(html.stem + "_files")
        images = write_plots(payload, folder)
        with atomic_outputs(html) as (tmp_html,):
            write_html(payload, tmp_html, images)
        output_console().print(escape(f"wrote {html} ({len(images)} plots in {folder})"), highlight=False)


INSTANCES_EXAMPLES = """\
Examples (from the repository root):

# the PI-DeepONet sample: each of its 200 test functions (minutes)
lsr instances --config configs/antiderivative.yaml \\
    --out runs/antiderivative.instances.h5
# the first 10 instances, with plots (needs matplotlib)
lsr instances --config configs/antiderivative.yaml --count 10 \\
    --out runs/antiderivative10.instances.h5 --plots runs/antiderivative10
"""


@app.command("instances", epilog=INSTANCES_EXAMPLES)
def instances_cmd(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(help="Operator network (default: model.checkpoint of the config)."),
    ] = None,
    config: Annotated[
        Path | None,
        Option("--config", "-c", help="YAML config with `pde:` and `instances:` sections.", rich_help_panel=INPUTS),
    ] = None,
    data: DataOpt = None,
    count: Annotated[
        int | None, Option("--count", help="Only the first N instances (instances.count).", rich_help_panel=INPUTS)
    ] = None,
    rank: RankOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    debug: DebugOpt = False,
    out: Annotated[
        Path | None,
        Option("--out", "-o", help="HDF5 predictions (default: CHECKPOINT.instances.h5).", rich_help_panel=OUTPUT),
    ] = None,
    report: ReportOpt = None,
    plots: PlotsOpt = None,
    force: Annotated[
        bool,
        Option(
            "--force",
            help="Overwrite outputs and discard an interrupted run's finished instances.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Per-instance physics-informed LSR of an operator network.

    One-shot LSR on each instance's physics residual; an interrupted run continues where it stopped."""
    t_start = time.perf_counter()
    with _guard(debug):
        _single_process_only("instances")
        cfg, base = _config(config)
        if cfg.pde is None:
            raise ConfigError("lsr instances needs a config with `pde:` and `instances:` sections (--config FILE)")
        _apply_overrides(cfg, device=device, dtype=dtype, seed=seed, rank=rank)
        if count is not None:
            if count < 1:
                raise ConfigError(f"--count: must be at least 1, got {count}")
            cfg.instances = {**(cfg.instances or {}), "count": count}
        start = checkpoint or _relative(cfg.model.checkpoint, base)
        if start is None:
            raise ConfigError("no checkpoint: pass CHECKPOINT or set model.checkpoint in the config")
        data_path = _data_path(data, cfg, base)
        resolve_device(cfg.device)
        out_path, report_path = _output_paths(out, report, cfg, base, start.with_name(start.stem + ".instances.h5"))
        inputs = [start, data_path] + ([config] if config else [])
        check_output_path(out_path, inputs, force, "predictions file")
        check_output_path(report_path, inputs + [out_path], force, "report")
        if not start.is_file():
            raise CheckpointError(f"{start}: checkpoint file not found")
        if not data_path.is_file():
            raise DataError(f"{data_path}: data file not found")
        spec, num = parse_instances(cfg.instances, data_path)
        partial = out_path.with_name(out_path.name + ".partial")
        check_output_path(partial, inputs, True, "partial predictions file")
        _check_plots(plots, inputs)
        ckpt = load_checkpoint(start, cfg.model, base)
        if ckpt.delta is not None:
            raise CheckpointError(f"{start}: a refined checkpoint; per-instance LSR starts from the plain network")
        _warn(ckpt.warnings, quiet or as_json)
        # one instance's problem, parsed up front: config errors surface before any work
        parse_problem(cfg.pde, data_path, torch.Generator().manual_seed(cfg.seed), base, (spec.group, 0))
        show = not (quiet or as_json)
        try:
            with progress_sink(_err, enabled=show) as progress:
                result = run_instances(
                    ckpt, cfg, spec, num, data_path, partial, fingerprint(cfg, start, data_path), base, force, progress
                )
        except KeyboardInterrupt:
            raise _fail(
                f"interrupted; finished instances are kept in {partial}: run the same command again to continue",
                130,
            ) from None
        _warn(result.warnings, quiet or as_json)
        timings = {**result.timings, "total": time.perf_counter() - t_start}
        with atomic_outputs(out_path, report_path) as (tmp_out, tmp_report):
            shutil.copyfile(partial, tmp_out)
            payload = instances_report(
                result,
                input={"checkpoint": str(start), "format": ckpt.format},
                output={"predictions": str(out_path), "report": str(report_path)},
                data={"path": str(data_path), "group": spec.group, "inputs": spec.inputs, "layout": spec.layout},
                config=cfg.to_dict(),
                timings=timings,
                seed=cfg.seed,
            )
            write_json(tmp_report, payload)
        partial.unlink(missing_ok=True)
        html = _write_plots(plots, payload) if plots is not None else None
        if as_json:
            sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        elif not quiet:
            _print_results(instances_table(payload), result.message, out_path, report_path, html)


ITERATE_EXAMPLES = """\
Examples (from the repository root):

# the Poisson PINN (CHECKPOINT from model.checkpoint; minutes)
lsr iterate --config configs/poisson2d.yaml --out runs/poisson.iterated.pt
# two more iterations from where that run stopped
lsr iterate --config configs/poisson2d.yaml --out runs/poisson.iterated.pt \\
    --resume --iterations 2
# the state-dict checkpoint, one iteration at a fixed rank
lsr iterate sample_data/poisson2d_state_dict.pt \\
    --config configs/poisson2d.yaml --out runs/poisson_sd.iterated.pt \\
    --iterations 1 --rank 800
# a supervised network (no `pde:` section): chosen on the val split
lsr iterate sample_data/regression_state_dict.pt \
    --config configs/regression.yaml --out runs/regression.iterated.pt
"""


@app.command("iterate", epilog=ITERATE_EXAMPLES)
def iterate_cmd(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(help="Network to start from (default: model.checkpoint of the config)."),
    ] = None,
    config: Annotated[
        Path | None,
        Option("--config", "-c", help="YAML config (a `pde:` section, or supervised splits).", rich_help_panel=INPUTS),
    ] = None,
    data: Annotated[
        Path | None,
        Option("--data", "-d", help="HDF5 file: collocation points, reference.", rich_help_panel=INPUTS),
    ] = None,
    iterations: Annotated[
        int | None, Option("--iterations", help="Outer iterations (iterate.iterations).", rich_help_panel=LSR)
    ] = None,
    rank: Annotated[
        str | None, Option("--rank", help="LSR rank per iteration: 'auto', N or N1,N2,...", rich_help_panel=LSR)
    ] = None,
    resume: Annotated[
        bool, Option("--resume", help="Continue from OUT and its report (adds iterations).", rich_help_panel=LSR)
    ] = False,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    nproc: NprocOpt = None,
    debug: DebugOpt = False,
    out: Annotated[
        Path | None, Option("--out", "-o", help="Network (default: CHECKPOINT.iterated.pt).", rich_help_panel=OUTPUT)
    ] = None,
    report: ReportOpt = None,
    plots: PlotsOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Iterative LSR: a plain network from the refined predictor.

    Alternates one-shot LSR with a fit of the network to the refined predictor
    (Levenberg-Marquardt steps; L-BFGS when iterate.lbfgs_iterations > 0); an iteration is
    kept only if the network's residual at fresh validation points falls (PDE configs) or its
    loss on the val split falls (supervised data, no `pde:` section).

    Writes a plain network in the input's format."""
    opts: dict[str, Any] = {
        "checkpoint": checkpoint,
        "config": config,
        "data": data,
        "out": out,
        "report": report,
        "iterations": iterations,
        "rank": rank,
        "resume": resume,
        "device": device,
        "dtype": dtype,
        "seed": seed,
        "plots": plots,
        "force": force,
        "quiet": quiet,
        "as_json": as_json,
        "debug": debug,
    }
    t_start = time.perf_counter()
    try:
        with _guard(debug):
            _check_nproc(nproc)
            if nproc is not None and nproc > 1:
                if _config(config)[0].pde is None:
                    raise ConfigError(
                        "--nproc: `lsr iterate` on supervised data (no `pde:` section) runs on one process"
                    )
                code = _launch(nproc, _refine_argv("iterate", **opts))
                if code != 0:
                    raise typer.Exit(code)
                return
            cfg, base = _config(config)
            _apply_overrides(cfg, device=device, dtype=dtype, seed=seed, rank=rank)
            if iterations is not None:
                if iterations < 1:
                    raise ConfigError(f"--iterations: must be at least 1, got {iterations}")
                cfg.iterate.iterations = iterations
            comm, cfg.device = init_from_env(cfg.device)
            _comm["comm"] = comm
            try:
                _iterate_run(cfg, base, comm, t_start, **opts)
            except BaseException:
                if comm.distributed:
                    _comm["failed"] = comm
                raise
            else:
                _finish_worker(comm)
    except typer.Exit as exc:
        _leave_if_failed_rank(exc)
        raise
    finally:
        _comm["comm"] = SINGLE


def _iterate_run(
    cfg: Config,
    base: Path | None,
    comm: Comm,
    t_start: float,
    *,
    checkpoint: Path | None,
    config: Path | None,
    data: Path | None,
    out: Path | None,
    report: Path | None,
    resume: bool,
    plots: Path | None,
    quiet: bool,
    as_json: bool,
    force: bool,
    **_: Any,
) -> None:
    """The body of ``lsr iterate`` on one process or one rank of a distributed run.

    Distributed: every rank holds its share of every block's points and runs every iteration
    (the network is replicated, the steps identical); rank 0 alone prints and writes, and
    every rank learns whether that succeeded (as in ``lsr refine``)."""
    distributed = comm.distributed
    root = comm.is_root
    start = checkpoint or _relative(cfg.model.checkpoint, base)
    if start is None:
        raise ConfigError("no checkpoint: pass CHECKPOINT or set model.checkpoint in the config")
    supervised = cfg.pde is None  # supervised data: the splits of the data file
    if supervised and data is None and not cfg.data.path:
        raise ConfigError(
            "lsr iterate needs a config with a `pde:` section (--config FILE), or supervised data: "
            "pass --data FILE or set data.path"
        )
    data_path = _data_path(data, cfg, base) if supervised else _optional_data_path(data, cfg, base)
    resolve_device(cfg.device)
    out_path, report_path = _output_paths(out, report, cfg, base, start.with_name(start.stem + ".iterated.pt"))
    previous: list[dict[str, Any]] = []
    source = start
    if resume:
        if not out_path.is_file() or not report_path.is_file():
            raise OutputError(
                f"{out_path}: --resume needs the network and report of an earlier run ({out_path}, {report_path})"
            )
        try:
            previous = list(json.loads(report_path.read_text(encoding="utf-8"))["iterations"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OutputError(f"{report_path}: not an `lsr iterate` report ({exc})") from None
        source = out_path
    inputs = [start] + ([data_path] if data_path else []) + ([config] if config else [])
    if root:
        check_output_path(out_path, inputs, force or resume, "network")
        check_output_path(report_path, inputs + [out_path], force or resume, "report")
        _check_plots(plots, inputs)
    if not source.is_file():
        raise CheckpointError(f"{source}: checkpoint file not found")

    t0 = time.perf_counter()
    ckpt = load_checkpoint(source, cfg.model, base)
    original = {k: v.dtype for k, v in ckpt.module.state_dict().items()}
    meter: MemoryMeter | None = None
    if distributed:
        run_device = resolve_device(cfg.device)
        warm_up_autodiff(run_device)
        meter = MemoryMeter(run_device)
    if supervised:
        assert data_path is not None
        splits = read_data(data_path, cfg.data, TORCH_DTYPES[cfg.dtype])
        data_info: dict[str, Any] = {"path": str(data_path), "splits": _split_info(splits)}
        local_rows = splits["train"].num_samples
    else:
        problem = parse_problem(cfg.pde, data_path, torch.Generator().manual_seed(cfg.seed), base)
        guessed = [u.name for u in problem.unknowns if u.parameter is None]
        if resume and guessed:
            raise ConfigError(
                f"config.pde.unknowns.{guessed[0]}: --resume restarts from the written network, which does not "
                "hold an unknown given by an initial guess; give its refined value as the new guess and run "
                "without --resume"
            )
        data_info = {"path": str(data_path) if data_path else None, **_problem_info(problem)}
        problem.shard(comm.rank, comm.world)
        local_rows = problem.num_rows
    fault_point("load", comm)
    t_load = time.perf_counter() - t0
    _warn(ckpt.warnings, quiet or as_json or not root)
    show = not (quiet or as_json) and root

    def on_iteration(entry: dict[str, Any]) -> None:
        if show:
            _err.print(escape(_iteration_line(entry)), highlight=False, soft_wrap=not _err.is_terminal)

    start_it = previous[-1]["iteration"] + 1 if previous else 0
    with progress_sink(_err, enabled=show) as progress:
        if supervised:
            result = iterate_supervised(ckpt, splits, cfg, progress, start_it, on_iteration)
        else:
            result = iterate(ckpt, problem, cfg, progress, data_path, base, start_it, on_iteration, comm)
    _warn(result.warnings, quiet or as_json or not root)

    def write(ranks: list[dict[str, Any]]) -> None:
        _write_iterate_outputs(
            out_path,
            report_path,
            plots,
            quiet,
            as_json,
            cfg,
            comm,
            t_start,
            t_load=t_load,
            start=start,
            source=source,
            resume=resume,
            ckpt=ckpt,
            original=original,
            result=result,
            previous=previous,
            data_info=data_info,
            ranks=ranks,
        )

    _finish_on_root(comm, meter, t_start, local_rows, write)


def _write_iterate_outputs(
    out_path: Path,
    report_path: Path,
    plots: Path | None,
    quiet: bool,
    as_json: bool,
    cfg: Config,
    comm: Comm,
    t_start: float,
    *,
    t_load: float,
    start: Path,
    source: Path,
    resume: bool,
    ckpt: LoadedCheckpoint,
    original: dict[str, torch.dtype],
    result: IterateResult,
    previous: list[dict[str, Any]],
    data_info: dict[str, Any],
    ranks: list[dict[str, Any]],
) -> None:
    """Rank 0 (or the only process): the network and the report, atomically; plots; the table."""
    t1 = time.perf_counter()
    metadata = None
    if result.unknowns:  # pde.unknowns: the kept values, as `lsr refine` records them
        metadata = {
            "lsr_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": str(start),
            "command": "iterate",
            "best_iteration": result.best_iteration,
            "dtype": result.dtype,
            "unknowns": {k: v["after"] for k, v in result.unknowns.items()},
        }
    with atomic_outputs(out_path, report_path) as (tmp_out, tmp_report):
        saved_dtype = _save_network(tmp_out, ckpt, result, original, cfg.iterate.save_dtype, metadata)
        timings = {
            "load": t_load,
            **result.timings,
            "save": time.perf_counter() - t1,
            "total": time.perf_counter() - t_start,
        }
        payload = {
            "command": "iterate",
            "status": result.status,
            "message": result.message,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "input": {
                "checkpoint": str(start),
                "format": ckpt.format,
                "resumed_from": str(source) if resume else None,
            },
            "output": {
                "checkpoint": str(out_path),
                "format": ckpt.format,
                "report": str(report_path),
                "dtype": saved_dtype,
            },
            "data": data_info,
            "best_iteration": result.best_iteration,
            "selection": result.selection,
            "stop_reason": result.stop_reason,
            "iterations": previous + result.history,
            "splits": result.errors,
            "residual_blocks": result.residual_blocks,
            "residual_loss": result.residual_loss,
            **({"unknowns": result.unknowns} if result.unknowns else {}),
            "timings": timings,
            "peak_memory_bytes": result.peak_memory_bytes,
            "peak_memory_kind": result.peak_memory_kind,
            "device": result.device,
            "dtype": result.dtype,
            "seed": cfg.seed,
            "num_parameters": result.num_parameters,
            "num_residuals": result.num_residuals,
            "config": cfg.to_dict(),
            "versions": versions(),
            "warnings": result.warnings,
        }
        if comm.distributed:
            payload["distributed"] = _distributed_field(comm, ranks)
        write_json(tmp_report, clean_json(payload))
    html = _write_plots(plots, clean_json(payload)) if plots is not None else None
    if as_json:
        sys.stdout.write(json.dumps(clean_json(payload), indent=2) + "\n")
    elif not quiet:
        _print_results(iterate_table(payload), result.message, out_path, report_path, html)


def _iteration_line(e: dict[str, Any]) -> str:
    ref = e["reference_rel_l2"]
    refs = (
        ""
        if ref["network"] is None
        else f", reference rel L2 {ref['linearized']:.2e} (LSR) / {ref['network']:.2e} (net)"
    )
    return (
        f"iteration {e['iteration']}: rank {e['rank']}, residual {e['residual_loss']['linearized']:.2e} (LSR) / "
        f"{e['residual_loss']['network']:.2e} (net){refs}, fit {e['alignment']['relative_fit']:.1e}, "
        f"{e['seconds']['total']:.1f}s"
    )


ITERATE_METADATA = "lsr.json"
"""The extra file of a TorchScript network written by ``lsr iterate`` with its metadata."""


def _save_network(
    out: Path,
    ckpt: LoadedCheckpoint,
    result: IterateResult,
    original: dict[str, torch.dtype],
    save_dtype: str,
    metadata: dict[str, Any] | None = None,
) -> str:
    """The best network as a plain checkpoint in the input's format; returns the dtype written.

    ``metadata`` (with ``pde.unknowns``): TorchScript keeps it as the extra file
    ``ITERATE_METADATA`` (``torch.jit.load(path, _extra_files={ITERATE_METADATA: ""})``), a state
    dict as its non-tensor entry ``metadata`` (loaders of weights skip it)."""
    module = result.module.to("cpu")
    if save_dtype == "original":
        first = next((d for d in original.values() if d.is_floating_point), torch.float64)  # a real dtype
        target = first
    else:
        target = TORCH_DTYPES[save_dtype]
    if ckpt.format == "torchscript":
        extra = {ITERATE_METADATA: json.dumps(metadata)} if metadata else {}
        cast_module(module, target, torch.device("cpu")).save(str(out), _extra_files=extra)  # type: ignore[operator]
    else:
        state = {
            k: (
                v.to(original[k])
                if save_dtype == "original" and k in original and (v.is_floating_point() or v.is_complex())
                else cast_tensor(v, target)
            )
            for k, v in module.state_dict().items()
        }
        torch.save({**state, "metadata": metadata} if metadata else state, out)
    return str(target).replace("torch.", "")


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["EXIT_CODES", "OutputError", "app", "main"]
