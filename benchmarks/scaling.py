"""Scaling of matrix-free LSR against a dense Jacobian: time per stage and peak memory.

Usage::

    python benchmarks/scaling.py [--quick] [--threads 2] [--json results.json]

Two sweeps of a tanh MLP ``2 → w → w → w → 1`` (float64, random weights) on ``n`` random
points of ``[-1, 1]²`` with residual ``f0 = q(θ0, X) − sin(πx)·cos(πy)``:

* growing ``m`` (parameters; width ``w``) at a fixed ``n``;
* growing ``n`` (residual rows) at a fixed width.

Each configuration runs the LSR pipeline with a fixed sketch of ``k = rank + oversampling``
columns, through the library classes: :class:`RangeSketch` (``extend`` = ``JΩ``, QR, ``JᵀQ``;
the operator is wrapped so that its ``matmat``/``rmatmat`` calls are timed, and QR is the rest
of ``extend``), the SVD of ``B`` (``usable_rank`` + ``basis``), the projection ``A = J P``
and :class:`ReducedProblem` (QR of ``A`` + one solve). It does so twice:

* matrix-free: ``J`` is the library's :class:`JacobianOperator` (JVPs / VJPs);
* dense: ``J`` is first materialized as an ``n × m`` tensor (``torch.func.jacrev`` of
  ``torch.func.functional_call`` per sample, vmapped over row chunks), then the same pipeline
  runs on it with plain matrix products. Skipped where ``n·m·8`` bytes exceed ``--dense-limit-gib``.

Peak memory: each (configuration, method) runs in a fresh subprocess of this script, which
reports ``ru_maxrss`` at its end; the extra memory is that minus the peak of a baseline
subprocess that imports torch and ``lsr_cli``, builds the same model and data, and runs both
pipelines once on 16 rows. That warm-up is in every subprocess: the first ``torch.func``
call of a process loads code worth ~90 MB of RSS and ~3 s, which would otherwise swamp the
size-dependent part. Times are the minimum over ``--repeats`` runs per stage, after the warm-up.

Markdown tables go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lsr_cli.linearization import JacobianOperator, ParameterSpace
from lsr_cli.models import MLP
from lsr_cli.refine import ROW_BUDGET, peak_memory_bytes
from lsr_cli.sketch import RangeSketch
from lsr_cli.solve import ReducedProblem

DTYPE = torch.float64
CPU = torch.device("cpu")
MIB = 2**20
GIB = 2**30
IN_FEATURES, OUT_FEATURES, DEPTH = 2, 1, 3
WARMUP_ROWS = 16
WARMUP_RANK = 4
AUTO_ROW_CHUNK = ROW_BUDGET // OUT_FEATURES // 32  # refine's ``row_chunk: auto``
METHODS = ("free", "dense")
STAGES = {  # key → column label, in pipeline order
    "jacobian": "J = jacrev",
    "matmat": "JΩ",
    "orth": "QR(JΩ)",
    "rmatmat": "JᵀQ",
    "svd": "SVD(B)",
    "project": "A = JP",
    "solve": "QR(A)+solve",
}
PROFILES = {
    "full": {
        "widths": (16, 32, 64, 96, 128),
        "fixed_n": 2000,
        "ns": (500, 1000, 2000, 4000, 8000, 16000),
        "fixed_width": 64,
        "repeats": 3,
    },
    "quick": {"widths": (16, 32, 64), "fixed_n": 1000, "ns": (250, 500, 1000, 2000), "fixed_width": 32, "repeats": 1},
}


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Settings:
    """What every subprocess of one benchmark run shares."""

    rank: int
    oversampling: int
    threads: int
    seed: int
    row_chunk: int
    tangent_chunk: int
    repeats: int

    @property
    def columns(self) -> int:
        return self.rank + self.oversampling


@dataclass(frozen=True)
class Case:
    """One problem size: hidden width ``w`` (hence ``m``) and ``n`` residual rows."""

    width: int
    n: int

    @property
    def m(self) -> int:
        sizes = [IN_FEATURES, *[self.width] * DEPTH, OUT_FEATURES]
        return sum(a * b + b for a, b in pairwise(sizes))

    def sketch_bytes(self, columns: int) -> int:
        """``(n + m)·k·8``: ``Q`` and ``B`` of the sketch."""
        return (self.n + self.m) * columns * 8

    def dense_bytes(self) -> int:
        """``n·m·8``: the dense Jacobian."""
        return self.n * self.m * 8


# --------------------------------------------------------------------------- problem


@dataclass
class Problem:
    model: MLP
    space: ParameterSpace
    inputs: Tensor  # [n, 2]
    f0: Tensor  # [n] residual at θ0

    def head(self, rows: int) -> Problem:
        return replace(self, inputs=self.inputs[:rows], f0=self.f0[:rows])


def build_problem(case: Case, seed: int) -> Problem:
    """Random-weight tanh MLP and random points, all drawn from explicit generators."""
    model = MLP(IN_FEATURES, OUT_FEATURES, (case.width,) * DEPTH, "tanh").to(DTYPE).eval()
    weights = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=weights, dtype=DTYPE) * p.shape[-1] ** -0.5)
    points = torch.Generator().manual_seed(seed + 1)
    x = 2 * torch.rand(case.n, IN_FEATURES, generator=points, dtype=DTYPE) - 1
    target = torch.sin(math.pi * x[:, :1]) * torch.cos(math.pi * x[:, 1:])
    with torch.no_grad():
        f0 = (model(x) - target).reshape(-1)
    space = ParameterSpace({name: p.detach() for name, p in model.named_parameters()})
    return Problem(model, space, x, f0)


# --------------------------------------------------------------------------- operators


class DenseOperator:
    """``J`` held as a tensor, with the operator interface :class:`RangeSketch` needs."""

    def __init__(self, J: Tensor) -> None:
        self.J = J

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.J.shape[0]), int(self.J.shape[1]))

    def matmat(self, V: Tensor, progress: Callable[[int], None] | None = None) -> Tensor:
        return self.J @ V

    def rmatmat(self, U: Tensor, progress: Callable[[int], None] | None = None) -> Tensor:
        return self.J.T @ U


class TimedOperator:
    """Forwards to ``op`` and accumulates the seconds spent in ``matmat`` and ``rmatmat``."""

    def __init__(self, op: JacobianOperator | DenseOperator) -> None:
        self.op = op
        self.seconds = {"matmat": 0.0, "rmatmat": 0.0}

    @property
    def shape(self) -> tuple[int, int]:
        return self.op.shape

    def _timed(self, name: str, fn: Callable[..., Tensor], X: Tensor, progress: Callable[[int], None] | None) -> Tensor:
        t0 = time.perf_counter()
        out = fn(X, progress)
        self.seconds[name] += time.perf_counter() - t0
        return out

    def matmat(self, V: Tensor, progress: Callable[[int], None] | None = None) -> Tensor:
        return self._timed("matmat", self.op.matmat, V, progress)

    def rmatmat(self, U: Tensor, progress: Callable[[int], None] | None = None) -> Tensor:
        return self._timed("rmatmat", self.op.rmatmat, U, progress)


def dense_jacobian(problem: Problem, row_chunk: int) -> Tensor:
    """``J`` ``[n, m]`` by per-sample ``jacrev`` (vmapped over row chunks), columns ordered like the space's."""
    model, space = problem.model, problem.space
    named = dict(model.named_parameters())
    params = {name: named[name].detach() for name in space.names}

    def output(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(model, p, (x[None],)).reshape(-1)

    per_sample = torch.func.vmap(torch.func.jacrev(output), in_dims=(None, 0))
    n = problem.inputs.shape[0]
    J = problem.inputs.new_empty(n, space.num)
    for s in range(0, n, row_chunk):
        rows = problem.inputs[s : s + row_chunk]
        J[s : s + rows.shape[0]] = space.flatten(per_sample(params, rows)).T
    return J


# --------------------------------------------------------------------------- pipeline


@contextmanager
def stopwatch(times: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    times[stage] = time.perf_counter() - t0


def lsr_pipeline(
    op: JacobianOperator | DenseOperator, f0: Tensor, settings: Settings
) -> tuple[dict[str, float], dict[str, Any]]:
    """Sketch, SVD, projection and reduced solve at a fixed rank, as ``refine`` does them."""
    timed = TimedOperator(op)
    sketch = RangeSketch(timed, torch.Generator().manual_seed(settings.seed + 2), DTYPE, CPU)
    times: dict[str, float] = {}
    with stopwatch(times, "extend"):
        sketch.extend(settings.columns)
    times.update(timed.seconds)
    times["orth"] = times.pop("extend") - timed.seconds["matmat"] - timed.seconds["rmatmat"]
    with stopwatch(times, "svd"):
        rank = min(settings.rank, sketch.usable_rank())
        P, S = sketch.basis(rank)
    with stopwatch(times, "project"):
        A = op.matmat(P)
    with stopwatch(times, "solve"):
        reduced = ReducedProblem(A, f0)
        solution = reduced.solve(rank)
    residual = float(torch.linalg.norm(reduced.residual(solution)) / torch.linalg.norm(f0))
    return times, {"rank": rank, "singular_values": S.tolist(), "linearized_residual": residual}


def run_free(problem: Problem, settings: Settings) -> tuple[dict[str, float], dict[str, Any]]:
    op = JacobianOperator(problem.model, problem.space, (problem.inputs,), settings.row_chunk, settings.tangent_chunk)
    return lsr_pipeline(op, problem.f0, settings)


def run_dense(problem: Problem, settings: Settings) -> tuple[dict[str, float], dict[str, Any]]:
    times: dict[str, float] = {}
    with stopwatch(times, "jacobian"):
        J = dense_jacobian(problem, settings.row_chunk)
    stage_times, check = lsr_pipeline(DenseOperator(J), problem.f0, settings)
    return {**times, **stage_times}, check


RUNNERS = {"free": run_free, "dense": run_dense}


# --------------------------------------------------------------------------- subprocesses


def warm_up(problem: Problem, settings: Settings) -> None:
    """Both pipelines on a few rows, so one-time code loading is in the baseline too."""
    small = replace(settings, rank=WARMUP_RANK, oversampling=WARMUP_RANK)
    for runner in RUNNERS.values():
        runner(problem.head(WARMUP_ROWS), small)


def worker(mode: str, case: Case, settings: Settings) -> dict[str, Any]:
    """Body of one measuring subprocess; ``mode`` is ``baseline`` or a key of :data:`RUNNERS`."""
    torch.set_num_threads(settings.threads)
    problem = build_problem(case, settings.seed)
    warm_up(problem, settings)
    result: dict[str, Any] = {"mode": mode}
    if mode in RUNNERS:
        runs = [RUNNERS[mode](problem, settings) for _ in range(settings.repeats)]
        result["times"] = {stage: min(times[stage] for times, _ in runs) for stage in runs[0][0]}
        result["check"] = runs[-1][1]
    result["peak_rss_bytes"] = peak_memory_bytes(CPU)[0]
    return result


def spawn(mode: str, case: Case, settings: Settings) -> dict[str, Any]:
    """Run :func:`worker` in a fresh Python process and return its JSON result."""
    spec = json.dumps({"mode": mode, "case": asdict(case), "settings": asdict(settings)})
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", spec], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} subprocess for {case} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_case(case: Case, settings: Settings, dense_limit_bytes: float) -> dict[str, Any]:
    """Baseline, matrix-free and (if it fits) dense subprocesses for one case."""
    modes = ["baseline", "free"] + (["dense"] if case.dense_bytes() <= dense_limit_bytes else [])
    record: dict[str, Any] = {
        "width": case.width,
        "m": case.m,
        "n": case.n,
        "k": settings.columns,
        "sketch_bytes": case.sketch_bytes(settings.columns),
        "dense_bytes": case.dense_bytes(),
        "chunk_block_bytes": min(case.n, settings.row_chunk) * settings.tangent_chunk * case.width * 8,
        "dense": None,
    }
    for mode in modes:
        print(f"  w={case.width:<4} m={case.m:<6} n={case.n:<6} {mode} ...", file=sys.stderr, flush=True)
        record[mode] = spawn(mode, case, settings)
    baseline = record["baseline"]["peak_rss_bytes"]
    for mode in METHODS:
        if record[mode] is not None:
            record[mode]["extra_bytes"] = record[mode]["peak_rss_bytes"] - baseline
            record[mode]["total_seconds"] = sum(record[mode]["times"].values())
    return record


# --------------------------------------------------------------------------- report


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_seconds(t: float | None) -> str:
    return "—" if t is None else f"{t:.3g}"


def fmt_mib(b: float | None) -> str:
    return "—" if b is None else f"{b / MIB:.1f}"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.3g}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def case_label(sweep: str, record: dict[str, Any]) -> list[str]:
    return [sweep, str(record["width"]), str(record["m"]), str(record["n"])]


def result_value(record: dict[str, Any], method: str, key: str) -> float | None:
    result = record.get(method)
    return None if result is None else result[key]


def timing_table(sweeps: dict[str, list[dict[str, Any]]]) -> str:
    headers = ["sweep", "w", "m", "n", "method", "r", *STAGES.values(), "total"]
    rows = []
    for sweep, records in sweeps.items():
        for record in records:
            for method in METHODS:
                result = record[method]
                if result is None:
                    continue
                stages = [fmt_seconds(result["times"].get(stage)) for stage in STAGES]
                rows.append(
                    [
                        *case_label(sweep, record),
                        method,
                        str(result["check"]["rank"]),
                        *stages,
                        fmt_seconds(result["total_seconds"]),
                    ]
                )
    return markdown_table(headers, rows)


def sigma_difference(record: dict[str, Any]) -> float | None:
    """``max |σ_free − σ_dense| / σ_1`` over the kept singular values (same Ω: round-off only)."""
    if record["dense"] is None:
        return None
    free = record["free"]["check"]["singular_values"]
    dense = record["dense"]["check"]["singular_values"]
    if not free or len(free) != len(dense):
        return math.inf
    return max(abs(a - b) for a, b in zip(free, dense, strict=True)) / free[0]


def memory_table(sweeps: dict[str, list[dict[str, Any]]]) -> str:
    headers = [
        "sweep",
        "w",
        "m",
        "n",
        "free extra MiB",
        "(n+m)·k·8 MiB",
        "JVP block MiB",
        "dense extra MiB",
        "n·m·8 MiB",
        "time free/dense",
        "memory free/dense",
        "‖Az+f0‖/‖f0‖",
        "Δσ/σ₁ (max)",
    ]
    rows = []
    for sweep, records in sweeps.items():
        for record in records:
            free_extra = result_value(record, "free", "extra_bytes")
            dense_extra = result_value(record, "dense", "extra_bytes")
            rows.append(
                [
                    *case_label(sweep, record),
                    fmt_mib(free_extra),
                    fmt_mib(record["sketch_bytes"]),
                    fmt_mib(record["chunk_block_bytes"]),
                    fmt_mib(dense_extra),
                    fmt_mib(record["dense_bytes"]),
                    fmt_ratio(
                        ratio(
                            result_value(record, "free", "total_seconds"),
                            result_value(record, "dense", "total_seconds"),
                        )
                    ),
                    fmt_ratio(ratio(free_extra, dense_extra)),
                    f"{record['free']['check']['linearized_residual']:.3g}",
                    fmt_ratio(sigma_difference(record)) if record["dense"] is not None else "—",
                ]
            )
    return markdown_table(headers, rows)


def loglog_slope(xs: Sequence[float], ys: Sequence[float | None]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` over the points with ``y > 0``."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y is not None and y > 0]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx > 0 else None


GROWTH_SERIES = {  # column label → value of a record
    "free extra": lambda r: result_value(r, "free", "extra_bytes"),
    "(n+m)·k": lambda r: r["sketch_bytes"],
    "dense extra": lambda r: result_value(r, "dense", "extra_bytes"),
    "n·m": lambda r: r["dense_bytes"],
    "free time": lambda r: result_value(r, "free", "total_seconds"),
    "dense time": lambda r: result_value(r, "dense", "total_seconds"),
}


def growth_table(sweep: str, records: list[dict[str, Any]]) -> str:
    """Ratios between successive sizes, and the fitted log-log slope, of each series."""
    size_key = "m" if sweep == "m" else "n"
    sizes = [r[size_key] for r in records]
    series = {label: [value(r) for r in records] for label, value in GROWTH_SERIES.items()}
    rows = []
    for i in range(1, len(records)):
        rows.append(
            [
                f"{sizes[i - 1]} → {sizes[i]}",
                fmt_ratio(sizes[i] / sizes[i - 1]),
                *(fmt_ratio(ratio(v[i], v[i - 1])) for v in series.values()),
            ]
        )
    rows.append(["log-log slope", "1", *(fmt_ratio(loglog_slope(sizes, v)) for v in series.values())])
    return markdown_table([size_key, f"{size_key} ratio", *GROWTH_SERIES], rows)


def report(sweeps: dict[str, list[dict[str, Any]]], settings: Settings, header: dict[str, Any]) -> str:
    parts = [
        "# LSR scaling: matrix-free vs dense Jacobian",
        "",
        "; ".join(f"{k}: {v}" for k, v in header.items()),
        "",
        "## Time per stage (s, min over repeats)",
        "",
        "`free`: JacobianOperator (JΩ, A = JP by JVPs; JᵀQ by VJPs). `dense`: `J = jacrev` materializes "
        "the n×m Jacobian, then the same stages are plain matrix products. QR(JΩ) is the rest of "
        "RangeSketch.extend (QR, Ω draw, concatenation); SVD(B) is usable_rank + basis.",
        "",
        timing_table(sweeps),
        "",
        "## Peak memory above baseline (ru_maxrss of a fresh subprocess) and ratios",
        "",
        f"JVP block = min(n, row_chunk)·tangent_chunk·w·8 bytes (row_chunk {settings.row_chunk}, tangent_chunk "
        f"{settings.tangent_chunk}): one batched hidden activation inside matmat/rmatmat, a working set that does "
        "not grow with n beyond row_chunk nor with k. Δσ/σ₁ (max) compares the sketch singular values of the two "
        "methods (same Ω: round-off only); ‖Az+f0‖/‖f0‖ is the matrix-free linearized residual at rank r.",
        "",
        memory_table(sweeps),
    ]
    for sweep, records in sweeps.items():
        parts += [
            "",
            f"## Growth along the {sweep} sweep (ratio between successive sizes)",
            "",
            growth_table(sweep, records),
        ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (under ~2 minutes)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every process (default 2)")
    parser.add_argument("--rank", type=int, default=64, help="rank r of the basis (default 64)")
    parser.add_argument("--oversampling", type=int, default=10, help="extra sketch columns; k = rank + oversampling")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weight, point and sketch generators")
    parser.add_argument("--widths", type=int, nargs="+", help="hidden widths of the m sweep")
    parser.add_argument("--fixed-n", type=int, help="n of the m sweep")
    parser.add_argument("--ns", type=int, nargs="+", help="row counts of the n sweep")
    parser.add_argument("--fixed-width", type=int, help="hidden width of the n sweep")
    parser.add_argument("--repeats", type=int, help="timed runs per subprocess (min is reported)")
    parser.add_argument(
        "--row-chunk",
        type=int,
        default=AUTO_ROW_CHUNK,
        help=f"JacobianOperator row_chunk (default {AUTO_ROW_CHUNK}, refine's 'auto')",
    )
    parser.add_argument("--tangent-chunk", type=int, default=32, help="JacobianOperator tangent_chunk (default 32)")
    parser.add_argument("--dense-limit-gib", type=float, default=2.0, help="skip dense where n·m·8 bytes exceed this")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_plan(args: argparse.Namespace) -> tuple[Settings, dict[str, list[Case]]]:
    profile = PROFILES["quick" if args.quick else "full"]

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return profile[name] if value is None else value

    settings = Settings(
        rank=args.rank,
        oversampling=args.oversampling,
        threads=args.threads,
        seed=args.seed,
        row_chunk=args.row_chunk,
        tangent_chunk=args.tangent_chunk,
        repeats=pick("repeats"),
    )
    sweeps = {
        "m": [Case(w, pick("fixed_n")) for w in pick("widths")],
        "n": [Case(pick("fixed_width"), n) for n in pick("ns")],
    }
    return settings, sweeps


def run_benchmark(args: argparse.Namespace) -> None:
    settings, plan = build_plan(args)
    torch.set_num_threads(settings.threads)
    header = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu threads": settings.threads,
        "dtype": "float64",
        "k": f"{settings.columns} (rank {settings.rank} + oversampling {settings.oversampling})",
        "row_chunk": settings.row_chunk,
        "tangent_chunk": settings.tangent_chunk,
        "repeats": settings.repeats,
        "seed": settings.seed,
    }
    t0 = time.perf_counter()
    cache: dict[Case, dict[str, Any]] = {}
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for sweep, cases in plan.items():
        print(f"{sweep} sweep:", file=sys.stderr, flush=True)
        for case in cases:
            if case not in cache:
                cache[case] = measure_case(case, settings, args.dense_limit_gib * GIB)
        sweeps[sweep] = [cache[case] for case in cases]
    header["wall time"] = f"{time.perf_counter() - t0:.0f} s"
    print(report(sweeps, settings, header))
    if args.json is not None:
        args.json.write_text(json.dumps({"settings": asdict(settings), "header": header, "sweeps": sweeps}, indent=1))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec["mode"], Case(**spec["case"]), Settings(**spec["settings"]))))
        return
    run_benchmark(args)


if __name__ == "__main__":
    main()
