"""The options the commands share, the config they start from, the overrides the flags make, and the
input and output paths (flag, else config, else beside the input)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lsr_cli.config import Config, load_config, parse_device, parse_dtype, parse_duration, parse_memory, parse_rank
from lsr_cli.errors import ConfigError


def load_cli_config(path: Path | None) -> tuple[Config, Path | None]:
    cfg = load_config(path)
    return cfg, (path.resolve().parent if path is not None else None)


def resolve_data_path(flag: Path | None, cfg: Config, base: Path | None) -> Path:
    if flag is not None:
        return flag
    if cfg.data.path:
        p = Path(cfg.data.path)
        return p if p.is_absolute() or base is None else base / p
    raise ConfigError("no data: pass --data FILE or set data.path in the config")


def resolve_optional_data_path(flag: Path | None, cfg: Config, base: Path | None) -> Path | None:
    """PDE problems may generate every point: the data file is then optional."""
    if flag is None and not cfg.data.path:
        return None
    return resolve_data_path(flag, cfg, base)


def output_paths(
    out: Path | None, report: Path | None, cfg: Config, base: Path | None, default: Path
) -> tuple[Path, Path]:
    """Output and report paths: flag, else config (relative to it), else beside the input."""
    out_path = out or relative_to_config(cfg.output.checkpoint, base) or default
    return out_path, report or relative_to_config(cfg.output.report, base) or out_path.with_name(
        out_path.stem + ".report.json"
    )


def relative_to_config(value: str | None, base: Path | None) -> Path | None:
    if value is None:
        return None
    p = Path(value)
    return p if p.is_absolute() or base is None else base / p


def apply_overrides(
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


Option = typer.Option

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
