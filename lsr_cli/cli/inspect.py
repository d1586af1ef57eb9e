"""``lsr inspect``: format, parameters and dtypes of a checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.markup import escape
from rich.table import Table

from lsr_cli.checkpoint import load_checkpoint
from lsr_cli.report import output_console

from .guard import guard, warn
from .options import (
    INPUTS,
    OUTPUT,
    DebugOpt,
    Option,
    load_cli_config,
)

INSPECT_EXAMPLES = """\
Examples (from the repository root):

lsr inspect sample_data/regression_torchscript.pt
# a state dict needs the model factory of its config
lsr inspect sample_data/darcy_fno_state_dict.pt \\
    --config configs/darcy_fno.yaml
"""


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
    with guard(debug):
        cfg, base = load_cli_config(config)
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
        warn(ckpt.warnings, False)
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
