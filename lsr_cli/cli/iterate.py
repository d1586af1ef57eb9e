"""``lsr iterate``: a plain network from the refined predictor."""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.markup import escape

from lsr_cli import __version__
from lsr_cli.checkpoint import LoadedCheckpoint, load_checkpoint
from lsr_cli.config import Config, parse_duration
from lsr_cli.data import read_data
from lsr_cli.distributed import SINGLE, Comm, fault_point, init_from_env
from lsr_cli.errors import CheckpointError, ConfigError, OutputError
from lsr_cli.iterate_supervised import iterate_supervised
from lsr_cli.outputs import atomic_outputs, check_output_path
from lsr_cli.pde import parse_problem
from lsr_cli.pde.iterate import IterateResult, iterate
from lsr_cli.report import clean_json, iterate_table, progress_sink, versions, write_json
from lsr_cli.runtime import TORCH_DTYPES, MemoryMeter, cast_module, cast_tensor, resolve_device, warm_up_autodiff

from .guard import current_comm, guard, stderr_console, warn
from .launch import (
    check_nproc,
    distributed_field,
    finish_on_root,
    finish_worker,
    launch,
    leave_if_failed_rank,
    worker_argv,
)
from .options import (
    INPUTS,
    LSR,
    OUTPUT,
    RUNTIME,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    NprocOpt,
    Option,
    PlotsOpt,
    QuietOpt,
    ReportOpt,
    SeedOpt,
    apply_overrides,
    load_cli_config,
    output_paths,
    relative_to_config,
    resolve_data_path,
    resolve_optional_data_path,
)
from .output import (
    check_plots,
    print_results,
    problem_info,
    split_info,
    write_plot_page,
)

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
    time_limit: Annotated[
        str | None,
        Option(
            "--time-limit",
            help="Wall-time budget of the iterations, e.g. 9min or 1h (sets iterate.time_limit; the best network "
            "so far is written when it runs out).",
            rich_help_panel=RUNTIME,
        ),
    ] = None,
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
        "time_limit": time_limit,
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
        with guard(debug):
            check_nproc(nproc)
            if nproc is not None and nproc > 1:
                if load_cli_config(config)[0].pde is None:
                    raise ConfigError(
                        "--nproc: `lsr iterate` on supervised data (no `pde:` section) runs on one process"
                    )
                code = launch(nproc, worker_argv("iterate", **opts))
                if code != 0:
                    raise typer.Exit(code)
                return
            cfg, base = load_cli_config(config)
            apply_overrides(cfg, device=device, dtype=dtype, seed=seed, rank=rank)
            if time_limit is not None:
                cfg.iterate.time_limit = parse_duration("iterate.time_limit (--time-limit)", time_limit)
            if iterations is not None:
                if iterations < 1:
                    raise ConfigError(f"--iterations: must be at least 1, got {iterations}")
                cfg.iterate.iterations = iterations
            comm, cfg.device = init_from_env(cfg.device)
            current_comm["comm"] = comm
            try:
                _iterate_run(cfg, base, comm, t_start, **opts)
            except BaseException:
                if comm.distributed:
                    current_comm["failed"] = comm
                raise
            else:
                finish_worker(comm)
    except typer.Exit as exc:
        leave_if_failed_rank(exc)
        raise
    finally:
        current_comm["comm"] = SINGLE


def _resumed(out_path: Path, report_path: Path) -> tuple[list[dict[str, Any]], Path]:
    """``--resume``: the iterations of the earlier run's report, and its network to start from."""
    if not out_path.is_file() or not report_path.is_file():
        raise OutputError(
            f"{out_path}: --resume needs the network and report of an earlier run ({out_path}, {report_path})"
        )
    try:
        previous = list(json.loads(report_path.read_text(encoding="utf-8"))["iterations"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"{report_path}: not an `lsr iterate` report ({exc})") from None
    return previous, out_path


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
    start = checkpoint or relative_to_config(cfg.model.checkpoint, base)
    if start is None:
        raise ConfigError("no checkpoint: pass CHECKPOINT or set model.checkpoint in the config")
    supervised = cfg.pde is None  # supervised data: the splits of the data file
    if supervised and data is None and not cfg.data.path:
        raise ConfigError(
            "lsr iterate needs a config with a `pde:` section (--config FILE), or supervised data: "
            "pass --data FILE or set data.path"
        )
    data_path = resolve_data_path(data, cfg, base) if supervised else resolve_optional_data_path(data, cfg, base)
    resolve_device(cfg.device)
    out_path, report_path = output_paths(out, report, cfg, base, start.with_name(start.stem + ".iterated.pt"))
    previous, source = _resumed(out_path, report_path) if resume else ([], start)
    inputs = [start] + ([data_path] if data_path else []) + ([config] if config else [])
    if root:
        check_output_path(out_path, inputs, force or resume, "network")
        check_output_path(report_path, inputs + [out_path], force or resume, "report")
        check_plots(plots, inputs)
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
        data_info: dict[str, Any] = {"path": str(data_path), "splits": split_info(splits)}
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
        data_info = {"path": str(data_path) if data_path else None, **problem_info(problem)}
        problem.shard(comm.rank, comm.world)
        local_rows = problem.num_rows
    fault_point("load", comm)
    t_load = time.perf_counter() - t0
    warn(ckpt.warnings, quiet or as_json or not root)
    show = not (quiet or as_json) and root

    def on_iteration(entry: dict[str, Any]) -> None:
        if show:
            stderr_console.print(
                escape(_iteration_line(entry)), highlight=False, soft_wrap=not stderr_console.is_terminal
            )

    start_it = previous[-1]["iteration"] + 1 if previous else 0
    with progress_sink(stderr_console, enabled=show) as progress:
        if supervised:
            result = iterate_supervised(ckpt, splits, cfg, progress, start_it, on_iteration)
        else:
            result = iterate(ckpt, problem, cfg, progress, data_path, base, start_it, on_iteration, comm)
    warn(result.warnings, quiet or as_json or not root)

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

    finish_on_root(comm, meter, t_start, local_rows, write)


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
            payload["distributed"] = distributed_field(comm, ranks)
        write_json(tmp_report, clean_json(payload))
    html = write_plot_page(plots, clean_json(payload)) if plots is not None else None
    if as_json:
        sys.stdout.write(json.dumps(clean_json(payload), indent=2) + "\n")
    elif not quiet:
        print_results(iterate_table(payload), result.message, out_path, report_path, html)


def _iteration_line(e: dict[str, Any]) -> str:
    ref = e["reference_rel_l2"]
    kept = "kept" if e["criterion"].get("kept") else "not kept"
    if e.get("step") == "physics":
        p = e["physics"]
        refs = "" if ref["network"] is None else f", reference rel L2 {ref['network']:.2e} (net)"
        return (
            f"iteration {e['iteration']}: physics pass, {p['steps']} steps (kept step {p['kept_step']}), residual "
            f"{e['residual_loss']['network']:.2e} (net){refs}, {kept}, {e['seconds']['total']:.1f}s"
        )
    refs = (
        ""
        if ref["network"] is None
        else f", reference rel L2 {ref['linearized']:.2e} (LSR) / {ref['network']:.2e} (net)"
    )
    return (
        f"iteration {e['iteration']}: rank {e['rank']}, residual {e['residual_loss']['linearized']:.2e} (LSR) / "
        f"{e['residual_loss']['network']:.2e} (net){refs}, fit {e['alignment']['relative_fit']:.1e}, {kept}, "
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
