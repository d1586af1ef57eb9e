"""The ``lsr`` command line (Typer). The only module that turns errors into exit codes.

Every :class:`~lsr_cli.errors.LsrError` becomes one line on stderr and its exit code; an
unexpected exception is a bug: one line and exit code 1, or the full traceback with
``--debug``. Outputs are written only when everything succeeded, atomically.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .checkpoint import LoadedCheckpoint, load_checkpoint, save_refined_state_dict
from .config import Config, load_config, parse_device, parse_dtype, parse_rank
from .data import read_data
from .errors import EXIT_CODES, CheckpointError, ConfigError, LsrError, OutputError
from .outputs import atomic_outputs, check_output_path
from .refine import RefineResult, evaluate, refine
from .report import RichProgress, errors_table, refine_report, refine_table, versions, write_json
from .runtime import TORCH_DTYPES, resolve_device
from .scripted import build_refined_script

app = typer.Typer(
    name="lsr",
    help="Linearized Subspace Refinement: make a trained network more accurate after training.",
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


def _fail(message: str, code: int) -> typer.Exit:
    _err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def _guard(debug: bool):
    """Map errors to one line + exit code (tracebacks only with ``--debug``)."""
    try:
        yield
    except typer.Exit:
        raise
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


def _relative(value: str | None, base: Path | None) -> Path | None:
    if value is None:
        return None
    p = Path(value)
    return p if p.is_absolute() or base is None else base / p


def _apply_overrides(cfg: Config, *, device: str | None, dtype: str | None, seed: int | None, rank: str | None) -> None:
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


def _split_info(data: dict[str, Any]) -> dict[str, Any]:
    return {name: {"group": s.group, "num_samples": s.num_samples, "inputs": s.input_names} for name, s in data.items()}


def _save_refined(
    out: Path, ckpt: LoadedCheckpoint, result: RefineResult, metadata: dict[str, Any], num_inputs: int
) -> str:
    """Write the refined checkpoint in the input's family to ``out``; returns the output format."""
    dtype = TORCH_DTYPES[result.dtype]
    if ckpt.format in ("torchscript", "refined_torchscript"):
        base = result.model.base.to("cpu")
        assert isinstance(base, torch.jit.ScriptModule)
        delta = {k: v.to("cpu") for k, v in result.delta.items()}
        build_refined_script(base, delta, num_inputs, metadata).save(str(out))
        return "refined_torchscript"
    save_refined_state_dict(out, ckpt, result.delta, dtype, metadata)
    return "refined_state_dict"


Option = typer.Option


@app.command("refine")
def refine_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="TorchScript or state-dict checkpoint (or a refined one).")],
    data: Annotated[Path | None, Option("--data", "-d", help="HDF5 data file (overrides data.path).")] = None,
    config: Annotated[Path | None, Option("--config", "-c", help="YAML config file.")] = None,
    out: Annotated[
        Path | None, Option("--out", "-o", help="Refined checkpoint [default: CHECKPOINT.refined.pt].")
    ] = None,
    report: Annotated[Path | None, Option("--report", "-r", help="JSON report [default: OUT.report.json].")] = None,
    rank: Annotated[
        str | None, Option("--rank", help="'auto', N, or a sweep 'N1,N2,...' (overrides lsr.rank).")
    ] = None,
    device: Annotated[str | None, Option("--device", help="auto | cpu | cuda | cuda:N.")] = None,
    dtype: Annotated[str | None, Option("--dtype", help="float64 (default) | float32 (fast).")] = None,
    seed: Annotated[int | None, Option("--seed", help="Seed of every random draw.")] = None,
    force: Annotated[bool, Option("--force", help="Overwrite existing outputs.")] = False,
    quiet: Annotated[bool, Option("--quiet", "-q", help="No progress, table or warnings.")] = False,
    as_json: Annotated[bool, Option("--json", help="Print the report as JSON on stdout and nothing else.")] = False,
    debug: Annotated[bool, Option("--debug", help="Show tracebacks of unexpected errors.")] = False,
) -> None:
    """One-shot LSR: refine CHECKPOINT on the training split of the HDF5 data."""
    t_start = time.perf_counter()
    with _guard(debug):
        cfg, base = _config(config)
        _apply_overrides(cfg, device=device, dtype=dtype, seed=seed, rank=rank)
        data_path = _data_path(data, cfg, base)
        resolve_device(cfg.device)
        out_path = (
            out or _relative(cfg.output.checkpoint, base) or checkpoint.with_name(checkpoint.stem + ".refined.pt")
        )
        report_path = report or _relative(cfg.output.report, base) or out_path.with_name(out_path.stem + ".report.json")
        inputs = [checkpoint, data_path] + ([config] if config else [])
        check_output_path(out_path, inputs, force, "refined checkpoint")
        check_output_path(report_path, inputs + [out_path], force, "report")
        if not checkpoint.is_file():
            raise CheckpointError(f"{checkpoint}: checkpoint file not found")

        t0 = time.perf_counter()
        ckpt = load_checkpoint(checkpoint, cfg.model, base)
        splits = read_data(data_path, cfg.data, TORCH_DTYPES[cfg.dtype])
        t_load = time.perf_counter() - t0
        _warn(ckpt.warnings, quiet or as_json)
        show = not (quiet or as_json)
        with RichProgress(_err, enabled=show) as progress:
            result = refine(ckpt, splits, cfg, progress)
        _warn(result.warnings, quiet or as_json)

        t1 = time.perf_counter()
        metadata = {
            "lsr_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": str(checkpoint),
            "source_format": ckpt.format,
            "rank": result.rank,
            "dtype": result.dtype,
            "refined_again": ckpt.is_refined,
        }
        timings = {"load": t_load, **result.timings}
        with atomic_outputs(out_path, report_path) as (tmp_out, tmp_report):
            out_format = _save_refined(tmp_out, ckpt, result, metadata, len(splits["train"].inputs))
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
                },
                output_info={"checkpoint": str(out_path), "format": out_format, "report": str(report_path)},
                data_info={"path": str(data_path), "splits": _split_info(splits)},
                config=cfg.to_dict(),
                timings=timings,
                seed=cfg.seed,
            )
            write_json(tmp_report, payload)
        if as_json:
            sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        elif not quiet:
            Console().print(refine_table(payload))
            Console().print(escape(f"{result.message}\nwrote {out_path} and {report_path}"), highlight=False)


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Any checkpoint, refined or not.")],
    data: Annotated[Path | None, Option("--data", "-d", help="HDF5 data file (overrides data.path).")] = None,
    config: Annotated[Path | None, Option("--config", "-c", help="YAML config (model factory, data layout).")] = None,
    device: Annotated[str | None, Option("--device", help="auto | cpu | cuda | cuda:N.")] = None,
    dtype: Annotated[str | None, Option("--dtype", help="float64 (default) | float32.")] = None,
    as_json: Annotated[bool, Option("--json", help="Print the errors as JSON on stdout and nothing else.")] = False,
    debug: Annotated[bool, Option("--debug", help="Show tracebacks of unexpected errors.")] = False,
) -> None:
    """Errors of CHECKPOINT on every split of the data (rel L2, RMSE, max |err|)."""
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
            Console().print(errors_table(escape(f"{checkpoint} ({ckpt.format})"), errors))


@app.command("inspect")
def inspect_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Any checkpoint, refined or not.")],
    config: Annotated[
        Path | None, Option("--config", "-c", help="YAML config (model factory for state dicts).")
    ] = None,
    as_json: Annotated[bool, Option("--json", help="Print as JSON on stdout and nothing else.")] = False,
    debug: Annotated[bool, Option("--debug", help="Show tracebacks of unexpected errors.")] = False,
) -> None:
    """Format, parameter count and shapes, dtypes of CHECKPOINT."""
    from rich.table import Table

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
                torch.linalg.norm(torch.cat([d.double().reshape(-1) for d in ckpt.delta.values()]))
            )
        if as_json:
            sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
            return
        _warn(ckpt.warnings, False)
        con = Console()
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


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["EXIT_CODES", "OutputError", "app", "main"]
