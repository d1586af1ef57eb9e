"""Documentation generated from the code stays in step with it: ``docs/configuration.md`` from
the typed config and the key tables of ``pde:`` / ``instances:``, and every command's ``--help``
ends with examples that name shipped files."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lsr_cli.config import Config
from lsr_cli.config_doc import documented_keys, render_configuration_md
from lsr_cli.pde.instances import INSTANCE_KEYS
from lsr_cli.pde.schema import _BLOCK_KEYS, _PDE_KEYS, _POINT_KEYS

from .test_cli import run

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION_MD = ROOT / "docs" / "configuration.md"
REGENERATE = "python -m lsr_cli.config_doc > docs/configuration.md"
HELP_WIDTH = 80
"""``--help`` must read well in an 80-column terminal."""


def _dataclass_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every field of ``cls`` and of its nested sections, with its dotted path."""
    out = []
    for f in dataclasses.fields(cls):
        out.append((prefix + f.name, f))
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            out += _dataclass_fields(factory, f"{prefix}{f.name}.")  # type: ignore[arg-type]
    return out


def test_committed_configuration_md_is_what_the_code_generates():
    assert CONFIGURATION_MD.read_text(encoding="utf-8") == render_configuration_md(), (
        f"docs/configuration.md is out of date: run `{REGENERATE}`"
    )


def test_every_config_field_has_help_text():
    missing = [path for path, f in _dataclass_fields(Config) if not str(f.metadata.get("help", "")).strip()]
    assert not missing, f"config fields without help text (add key(..., help=...)): {missing}"


def test_every_key_is_documented_once():
    sections = {path for path, f in _dataclass_fields(Config) if dataclasses.is_dataclass(f.default_factory)}
    expected = [path for path, _ in _dataclass_fields(Config) if path not in sections]
    expected += [f"pde.{k}" for k in _PDE_KEYS] + [f"pde.blocks[].{k}" for k in _BLOCK_KEYS]
    expected += [f"pde.blocks[].points.{k}" for k in _POINT_KEYS] + [f"instances.{k}" for k in INSTANCE_KEYS]
    keys = documented_keys()
    assert sorted(keys) == sorted(expected)
    rows = [line for line in render_configuration_md().splitlines() if line.startswith("| `")]
    for key in keys:
        assert sum(row.startswith(f"| `{key}` |") for row in rows) == 1, key


def test_configuration_md_tables_are_well_formed():
    for line in render_configuration_md().splitlines():
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]  # escaped bars are inside a cell
            assert len(cells) == 4, line


@pytest.mark.slow
def test_config_doc_module_prints_the_file():
    proc = subprocess.run(
        [sys.executable, "-m", "lsr_cli.config_doc"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == render_configuration_md()


def _examples(command: str) -> list[str]:
    """The example commands at the end of ``lsr COMMAND --help`` (continuation lines joined)."""
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "Traceback" not in text
    assert "Examples" in text, text
    tail = text[text.index("Examples") :]
    lines = [line.strip() for line in tail.splitlines()]
    assert all(len(line) <= HELP_WIDTH for line in tail.splitlines()), tail
    joined = re.sub(r"\\\s*\n\s*", " ", "\n".join(lines))
    return [line for line in joined.splitlines() if line.startswith("lsr ")]


@pytest.mark.parametrize(
    ("command", "least"), [("refine", 2), ("iterate", 2), ("instances", 2), ("evaluate", 2), ("inspect", 2)]
)
def test_help_ends_with_examples_on_the_shipped_samples(command, least):
    examples = _examples(command)
    assert len(examples) >= least, examples
    for example in examples:
        assert example.startswith(f"lsr {command} "), example
        for path in re.findall(r"(?:sample_data|configs)/\S+", example):
            assert (ROOT / path).is_file(), f"{example}: {path} is not in the repository"


def test_report_help_has_an_example():
    assert _examples("report") == ["lsr report runs/regression.refined.report.json --html runs/regression.html"]


def test_refine_help_groups_options_in_panels():
    text = run("refine", "--help").stdout
    positions = [text.index(f"─ {panel} ─") for panel in ("Inputs", "LSR", "Runtime", "Output")]
    assert positions == sorted(positions), text
    assert text.index("--rank") > positions[1] and text.index("--verbose") > positions[3]


def test_app_help_says_which_command_to_use():
    text = run("--help").stdout
    which = text[text.index("Which command") :]
    for command in ("`refine`", "`iterate`", "`instances`", "`evaluate`"):
        assert command in which, which
    assert "Exit codes" in text


def test_command_summaries_are_one_line_each():
    """``lsr --help`` at 80 columns lists every command on one unbroken line."""
    text = run("--help").stdout
    panel = text[text.index("─ Commands ─") :]
    rows = panel[: panel.index("╰")].splitlines()[1:]
    names = [row.strip("│ ").split(" ", 1)[0] for row in rows]
    assert sorted(names) == ["evaluate", "inspect", "instances", "iterate", "refine", "report"], panel
