"""``lsr instances``: per-instance physics-informed LSR of an operator network."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from lsr_cli.checkpoint import load_checkpoint
from lsr_cli.errors import CheckpointError, ConfigError, DataError
from lsr_cli.outputs import atomic_outputs, check_output_path
from lsr_cli.pde import parse_problem
from lsr_cli.pde.instances import fingerprint, parse_instances, run_instances
from lsr_cli.report import instances_report, instances_table, progress_sink, write_json
from lsr_cli.runtime import resolve_device

from .guard import fail, guard, single_process_only, stderr_console, warn
from .options import (
    INPUTS,
    OUTPUT,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    Option,
    PlotsOpt,
    QuietOpt,
    RankOpt,
    ReportOpt,
    SeedOpt,
    apply_overrides,
    load_cli_config,
    output_paths,
    relative_to_config,
    resolve_data_path,
)
from .output import (
    check_plots,
    print_results,
    write_plot_page,
)

INSTANCES_EXAMPLES = """\
Examples (from the repository root):

# the PI-DeepONet sample: each of its 200 test functions (minutes)
lsr instances --config configs/antiderivative.yaml \\
    --out runs/antiderivative.instances.h5
# the first 10 instances, with plots (needs matplotlib)
lsr instances --config configs/antiderivative.yaml --count 10 \\
    --out runs/antiderivative10.instances.h5 --plots runs/antiderivative10
"""


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
    with guard(debug):
        single_process_only("instances")
        cfg, base = load_cli_config(config)
        if cfg.pde is None:
            raise ConfigError("lsr instances needs a config with `pde:` and `instances:` sections (--config FILE)")
        apply_overrides(cfg, device=device, dtype=dtype, seed=seed, rank=rank)
        if count is not None:
            if count < 1:
                raise ConfigError(f"--count: must be at least 1, got {count}")
            cfg.instances = {**(cfg.instances or {}), "count": count}
        start = checkpoint or relative_to_config(cfg.model.checkpoint, base)
        if start is None:
            raise ConfigError("no checkpoint: pass CHECKPOINT or set model.checkpoint in the config")
        data_path = resolve_data_path(data, cfg, base)
        resolve_device(cfg.device)
        out_path, report_path = output_paths(out, report, cfg, base, start.with_name(start.stem + ".instances.h5"))
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
        check_plots(plots, inputs)
        ckpt = load_checkpoint(start, cfg.model, base)
        if ckpt.delta is not None:
            raise CheckpointError(f"{start}: a refined checkpoint; per-instance LSR starts from the plain network")
        warn(ckpt.warnings, quiet or as_json)
        # one instance's problem, parsed up front: config errors surface before any work
        parse_problem(cfg.pde, data_path, torch.Generator().manual_seed(cfg.seed), base, (spec.group, 0))
        show = not (quiet or as_json)
        try:
            with progress_sink(stderr_console, enabled=show) as progress:
                result = run_instances(
                    ckpt, cfg, spec, num, data_path, partial, fingerprint(cfg, start, data_path), base, force, progress
                )
        except KeyboardInterrupt:
            raise fail(
                f"interrupted; finished instances are kept in {partial}: run the same command again to continue",
                130,
            ) from None
        warn(result.warnings, quiet or as_json)
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
        html = write_plot_page(plots, payload) if plots is not None else None
        if as_json:
            sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        elif not quiet:
            print_results(instances_table(payload), result.message, out_path, report_path, html)
