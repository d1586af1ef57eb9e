"""``lsr evaluate``: the errors of any checkpoint on every split."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from lsr_cli.checkpoint import load_checkpoint
from lsr_cli.data import read_data
from lsr_cli.refine import evaluate
from lsr_cli.report import errors_table, output_console, versions
from lsr_cli.runtime import TORCH_DTYPES

from .guard import guard, warn
from .options import (
    INPUTS,
    OUTPUT,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    Option,
    apply_overrides,
    load_cli_config,
    resolve_data_path,
)

EVALUATE_EXAMPLES = """\
Examples (from the repository root):

lsr evaluate sample_data/regression_torchscript.pt \\
    --config configs/regression.yaml
# the output of `lsr refine`'s first example, as JSON
lsr evaluate runs/regression.refined.pt \\
    --config configs/regression.yaml --json
"""


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
    with guard(debug):
        cfg, base = load_cli_config(config)
        apply_overrides(cfg, device=device, dtype=dtype, seed=None, rank=None)
        data_path = resolve_data_path(data, cfg, base)
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
            warn(ckpt.warnings, False)
            output_console().print(errors_table(escape(f"{checkpoint} ({ckpt.format})"), errors))
