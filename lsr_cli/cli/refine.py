"""``lsr refine``: one-shot LSR of a checkpoint on training data or a PDE residual."""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from lsr_cli import __version__
from lsr_cli.budget import limit_allocator_slack
from lsr_cli.checkpoint import LoadedCheckpoint, load_checkpoint
from lsr_cli.config import Config, parse_output_format
from lsr_cli.data import read_data
from lsr_cli.distributed import SINGLE, Comm, fault_point, init_from_env
from lsr_cli.errors import CheckpointError
from lsr_cli.outputs import atomic_outputs, check_output_path
from lsr_cli.pde import PdeProblem, parse_problem, refine_pde
from lsr_cli.refine import RefineResult, refine
from lsr_cli.refined_checkpoint import refined_suffix, resolve_output_format, save_refined
from lsr_cli.report import NETWORK_NOTE, progress_sink, refine_report, refine_summary, refine_table, write_json
from lsr_cli.runtime import TORCH_DTYPES, MemoryMeter, resolve_device, resolve_memory_budget, warm_up_autodiff

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
    OUTPUT,
    CompileOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    MemoryOpt,
    NprocOpt,
    Option,
    PlotsOpt,
    QuietOpt,
    RankOpt,
    ReportOpt,
    SeedOpt,
    TimeLimitOpt,
    VerboseOpt,
    apply_overrides,
    load_cli_config,
    output_paths,
    resolve_data_path,
    resolve_optional_data_path,
)
from .output import (
    check_plots,
    error_fields,
    print_results,
    problem_info,
    reference_fields,
    split_info,
    time_budget_line,
    write_plot_page,
)


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
        leave_if_failed_rank(exc)
        raise
    finally:
        current_comm["comm"] = SINGLE


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
    with guard(debug):
        check_nproc(nproc)
        if nproc is not None and nproc > 1:
            argv = worker_argv(
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
            code = launch(nproc, argv)
            if code != 0:
                raise typer.Exit(code)
            return
        cfg, base = load_cli_config(config)
        apply_overrides(
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
        current_comm["comm"] = comm
        try:
            _refine_run(
                checkpoint, data, config, out, report, plots, force, quiet, as_json, cfg, base, comm, t_start, verbose
            )
        except BaseException:
            if comm.distributed:
                current_comm["failed"] = comm
            raise
        else:
            finish_worker(comm)


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
    data_path = resolve_optional_data_path(data, cfg, base) if pde_mode else resolve_data_path(data, cfg, base)
    resolve_device(cfg.device)
    out_path, report_path = output_paths(
        out, report, cfg, base, checkpoint.with_name(checkpoint.stem + refined_suffix(checkpoint, cfg.output.format))
    )
    inputs = [checkpoint] + ([data_path] if data_path else []) + ([config] if config else [])
    if root:
        check_output_path(out_path, inputs, force, "refined checkpoint")
        check_output_path(report_path, inputs + [out_path], force, "report")
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint file not found")
    if root:
        check_plots(plots, inputs)

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
        data_info: dict[str, Any] = {"path": str(data_path) if data_path else None, **problem_info(problem)}
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
        data_info = {"path": str(data_path), "splits": split_info(splits)}
        num_inputs = len(splits["train"].inputs)
        local_rows = splits["train"].num_samples
    fault_point("load", comm)
    t_load = time.perf_counter() - t0
    warn(ckpt.warnings, quiet or as_json or not root)
    show = not (quiet or as_json) and root
    with progress_sink(stderr_console, enabled=show) as progress:
        result = (
            refine_pde(ckpt, problem, cfg, progress, comm, meter)
            if pde_mode
            else refine(ckpt, splits, cfg, progress, meter, comm)
        )
    warn(result.warnings, quiet or as_json or not root)

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

    finish_on_root(comm, meter, t_start, local_rows, write)


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
        warn([out_info["warning"]] if "warning" in out_info else [], quiet or as_json)
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
            payload["distributed"] = distributed_field(comm, ranks)
        write_json(tmp_report, payload)
    html = None
    if plots is not None:
        fields: list[Any] = []
        if comm.world == 1:  # the error-field plots need every row on one process
            if isinstance(fields_source, PdeProblem):
                fields = reference_fields(result.model, fields_source)
            else:
                fields = error_fields(result.model, fields_source)
        html = write_plot_page(plots, payload, fields)
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    elif not quiet:
        note = NETWORK_NOTE if verbose else None
        summary = "\n".join(line for line in (refine_summary(payload), time_budget_line(payload)) if line)
        print_results(refine_table(payload, verbose), summary, out_path, report_path, html, note)
