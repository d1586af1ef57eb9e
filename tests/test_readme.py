"""README.md stays a short front door: its commands run as written (on the shipped samples, with
small settings where a run would take minutes), its Python snippets run, its install and two
commands are the ones ``.ci/run`` runs, and every relative link of the README and ``docs/``
points to a file (and heading) that exists."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from .test_cli import all_output, run

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
MAX_README_LINES = 220
"""Issue 18: the README is a front door, not the reference."""

COMMAND = re.compile(r"\blsr (?:refine|iterate|instances|evaluate|inspect|report)\b")
SHELL_END = re.compile(r"\s+(?:>|\|\||\||&&|;|#)")
"""Where an ``lsr`` command ends in a shell line: a redirection, pipe, list operator or comment."""

SMALL_SETTINGS: dict[str, list[str]] = {
    # command as written in the README -> options appended so that it runs in seconds here
    "lsr refine sample_data/regression_torchscript.pt --config configs/regression.yaml"
    " --out runs/regression.refined.pt --force": ["--rank", "64"],
    "lsr refine sample_data/regression_state_dict.pt --config configs/regression.yaml --out runs/sd.refined.pt": [
        "--rank",
        "64",
        "--force",
    ],
    "lsr evaluate runs/regression.refined.pt --config configs/regression.yaml": [],
    "lsr inspect runs/sd.refined.pt": [],
    "lsr refine sample_data/poisson2d_torchscript.pt --config configs/poisson2d.yaml --out runs/poisson.refined.pt": [
        "--rank",
        "200",
        "--force",
    ],
    "lsr refine sample_data/burgers_operator_torchscript.pt --config configs/burgers_operator.yaml"
    " --out runs/burgers_operator.refined.pt": ["--rank", "100", "--force"],
    "lsr instances --config configs/antiderivative.yaml --count 10 --out runs/antiderivative10.instances.h5": [
        "--count",
        "2",
        "--force",
    ],
}

SKIPPED: dict[str, str] = {
    # command as written in the README -> why this test does not run it
    "lsr iterate --config configs/poisson2d.yaml --out runs/poisson.iterated.pt": (
        "minutes on the shipped sample (2 iterations of 40 Gauss-Newton fit steps at rank 600: 143 CPU-s "
        "measured, 3.5 min wall); tests/test_iterate.py runs lsr iterate on small problems"
    ),
    'lsr refine "$ckpt" --config configs/regression.yaml --out "runs/batch/$name.refined.pt" --json': (
        "the body of a shell loop; examples/batch_refine.sh, the same loop, is run by tests/test_examples.py"
    ),
}


def _strip_code(markdown: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)


def _code_blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", markdown, flags=re.S | re.M)


def readme_commands() -> list[str]:
    """Every ``lsr COMMAND ...`` of the README's bash blocks, in order, up to the first shell
    operator or comment of its line (continuation lines joined)."""
    commands = []
    for block in _code_blocks(README.read_text(encoding="utf-8"), "bash"):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            found = COMMAND.search(line)
            if found:
                command = line[found.start() :]
                end = SHELL_END.search(command)
                commands.append((command[: end.start()] if end else command).strip())
    return commands


@contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository-root look-alike: the shipped samples and configs, and an empty ``runs/``."""
    d = tmp_path_factory.mktemp("readme")
    for name in ("sample_data", "configs"):
        (d / name).symlink_to(ROOT / name, target_is_directory=True)
    return d


def _out_path(args: list[str]) -> str | None:
    return args[args.index("--out") + 1] if "--out" in args else None


def _run_readme_command(command: str, workdir: Path) -> None:
    """Run ``command`` (with its small settings) in ``workdir``, first the README command that
    writes any ``runs/...`` input it reads."""
    args = shlex.split(command)[1:]
    for arg in args:
        if arg.startswith("runs/") and arg != _out_path(args) and not (workdir / arg).exists():
            _ensure(arg, workdir)
    with _working_directory(workdir):
        result = run(*args, *SMALL_SETTINGS[command])
    output = all_output(result)
    assert result.exit_code == 0, f"{command}\n{output}"
    assert "Traceback" not in output
    out = _out_path(args)
    if out is not None:
        assert (workdir / out).is_file(), f"{command}: {out} not written"


def _ensure(path: str, workdir: Path) -> None:
    """Write ``runs/...`` by the README command whose ``--out`` it is."""
    if (workdir / path).exists():
        return
    producers = [c for c in SMALL_SETTINGS if _out_path(shlex.split(c)) == path]
    assert producers, f"no README command writes {path}"
    _run_readme_command(producers[0], workdir)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; the reference belongs in docs/"


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    commands = readme_commands()
    assert len(commands) == len(set(commands)), commands
    assert not set(SMALL_SETTINGS) & set(SKIPPED)
    assert set(commands) == set(SMALL_SETTINGS) | set(SKIPPED), (
        "every lsr command of README.md is either run (SMALL_SETTINGS) or skipped with a reason (SKIPPED); "
        f"README: {sorted(commands)}"
    )


def _command_id(command: str) -> str:
    args = shlex.split(command)
    return f"{args[1]} {_out_path(args) or args[2]}"


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in readme_commands() if c in SMALL_SETTINGS], ids=_command_id)
def test_readme_command_runs(command, workdir):
    _run_readme_command(command, workdir)


@pytest.mark.slow
def test_readme_python_snippets_run(workdir):
    text = README.read_text(encoding="utf-8")
    snippets = _code_blocks(text, "python")
    assert snippets
    namespace: dict = {}
    for snippet in snippets:
        for path in re.findall(r"\"(runs/[^\"]+)\"", snippet):
            _ensure(path, workdir)
        with _working_directory(workdir):
            exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102 -- the README's own code
        y = namespace["y"]
        assert isinstance(y, torch.Tensor) and y.shape == (10, 1) and y.dtype == torch.float64


def test_install_and_the_two_commands_are_what_ci_runs():
    """``.ci/run`` installs exactly as the README says and runs the README's two commands."""
    readme = README.read_text(encoding="utf-8")
    readme_lines = {part.strip() for line in readme.splitlines() for part in line.split(" && ")}
    readme_lines |= {line.split("#")[0].strip() for line in readme.splitlines()}
    section = ""
    checked = 0
    for line in CI_RUN.read_text(encoding="utf-8").splitlines():
        if line.startswith("# ---"):
            section = line
            continue
        if "README" not in section or not line.strip() or line.startswith("#"):
            continue
        if "--upgrade pip" in line:  # CI's own housekeeping, not an install step of the README
            continue
        assert line.replace(" --quiet", "") in readme_lines, f".ci/run runs `{line}`, which README.md does not say"
        checked += 1
    assert checked >= 6


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(markdown: Path) -> set[str]:
    text = _strip_code(markdown.read_text(encoding="utf-8"))
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


DOCUMENTS = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(document):
    text = _strip_code(document.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{document.relative_to(ROOT)}: broken links {broken}"
