"""From the same checkpoint, same data, float64, TF32 off: LSR against what else a user can do.

Methods, per task:

- ``lsr``: one-shot LSR as ``lsr refine`` runs it (library call, default settings of the config).
  Its time is that of computing the step: loading the checkpoint and evaluating errors are not
  charged (nor are they for any other method), and when the first run takes under a minute a
  second, warm run is timed (the first call of torch.func transforms and LAPACK costs about a
  second on the Poisson sample; the Gauss–Newton step, run after LSR, is warm too);
- ``adam`` / ``lbfgs``: continued training of the checkpoint on the same loss (Adam, lr 1e-4;
  ``torch.optim.LBFGS`` with strong Wolfe line search) for the same wall time as ``lsr``, then
  for 3× that time;
- ``gauss_newton``: one full Gauss–Newton step with the dense Jacobian (truncated SVD at
  ``eps · max(n, m)``), where ``J`` fits in memory; also ``torch.linalg.lstsq`` with the same
  rcond and drivers gelsd and gelsy (time includes building ``J``);
- ``random_subspace``: the LSR reduced problem in a random Gaussian subspace of the rank LSR
  chose (ablation of the sketch);
- ``last_layer``: least squares in the last layer's parameters only (the classical "refit the
  head" baseline; exact, because the output is linear in them).

Tasks: the shipped samples (regression, Poisson 2-D PINN, Burgers PINN, DeepONet Burgers operator,
PI-DeepONet antiderivative) and a harder regression whose Adam residual sits in the tail of the
spectrum (``sin(πx) sin(πy) + 0.3 cos(4πxy)``, a tanh MLP 64×4 trained here). Errors: relative L2
on the test split, or against ``/reference`` for PINNs, of the refined predictor (linearized
methods) or of the network (Adam, L-BFGS). The antiderivative task is per instance, as
``lsr instances`` runs it: every method refines the network with one test function's input held
fixed on that function's physics residual alone, for 10 of the 200 test functions; its row is the
mean over them (errors and times).

    OMP_NUM_THREADS=1 python benchmarks/methods.py --out docs/benchmarks     # ~20-30 min on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/methods.py --tasks regression poisson2d --out /tmp/b

Writes ``methods.md`` (tables), ``methods.json`` and PNGs (error vs wall time per task, LSR's
rank sweep, the sketch's singular spectrum) into ``--out``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from lsr_cli import load_checkpoint, load_config, read_data
from lsr_cli.checkpoint import LoadedCheckpoint
from lsr_cli.config import Config
from lsr_cli.data import read_datasets, read_row
from lsr_cli.linearization import JacobianOperator, ParameterSpace, materialize
from lsr_cli.linearized import LinearizedModel
from lsr_cli.models import MLP
from lsr_cli.pde import parse_problem, refine_pde
from lsr_cli.pde.instances import InstanceModel, parse_instances
from lsr_cli.pde.refine_pde import build_operators
from lsr_cli.refine import predict, refine
from lsr_cli.runtime import cast_module, no_tf32
from lsr_cli.solve import QRAccumulator, ReducedProblem

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cpu")
DENSE_LIMIT = 3 * 2**30  # bytes of J for the Gauss-Newton step
WARM_RUN_LIMIT = 60.0  # seconds: LSR runs taking less are timed a second time, warm


@dataclass
class Task:
    name: str
    config: Config
    base: Path
    checkpoint: Path
    module: nn.Module  # float64 network at θ0
    loss: Callable[[nn.Module], Tensor]  # training loss (mean square of the weighted residual)
    error: Callable[[nn.Module], float]  # relative L2 on test / reference of a predictor module
    jacobian: Callable[[nn.Module, ParameterSpace], tuple[Any, Tensor]]  # (G operator, f0)
    run_lsr: Callable[[], Any]
    last_layer: list[str] = field(default_factory=list)
    fresh: Callable[[], nn.Module] | None = None  # a new float64 network at θ0 (default: the checkpoint)


def _rel(pred: Tensor, y: Tensor) -> float:
    return float(torch.linalg.norm(pred.reshape(y.shape) - y) / torch.linalg.norm(y))


def _last_layer(module: nn.Module) -> list[str]:
    names = [n for n, p in module.named_parameters() if p.is_floating_point()]
    prefix = names[-1].rsplit(".", 1)[0]
    return [n for n in names if n.rsplit(".", 1)[0] == prefix]


def supervised_task(name: str, config_path: Path, checkpoint: Path | None = None) -> Task:
    cfg = load_config(config_path)
    base = config_path.parent
    ckpt_path = checkpoint or ((base / cfg.model.checkpoint).resolve() if cfg.model.checkpoint else None)
    assert ckpt_path is not None, f"{config_path}: model.checkpoint needed"
    data_path = (base / str(cfg.data.path)).resolve()
    splits = read_data(data_path, cfg.data, torch.float64)
    module = cast_module(load_checkpoint(ckpt_path, cfg.model, base).module, torch.float64, DEVICE).eval()
    train, test = splits["train"], splits.get("test") or splits.get("val") or splits["train"]

    def out(m: nn.Module, s: Any) -> Tensor:
        return predict(m, s.inputs, 1024, shared=s.shared)

    def loss(m: nn.Module) -> Tensor:
        pred = m(*train.inputs)
        return torch.mean((pred.reshape(train.targets.shape) - train.targets) ** 2)

    def error(m: nn.Module) -> float:
        return _rel(out(m, test), test.targets)

    def jac(m: nn.Module, space: ParameterSpace) -> tuple[Any, Tensor]:
        op = JacobianOperator(m, space, train.inputs, 512, 32, shared=train.shared)
        f0 = (out(m, train).reshape(train.targets.shape) - train.targets).reshape(-1)
        return op, f0

    def run_lsr() -> Any:
        ckpt = load_checkpoint(ckpt_path, cfg.model, base)
        return refine(ckpt, splits, cfg)

    return Task(name, cfg, base, ckpt_path, module, loss, error, jac, run_lsr, _last_layer(module))


def _pde_methods(
    problem: Any, cfg: Config, x_ref: Tensor, u_ref: Tensor
) -> tuple[Callable[[nn.Module], Tensor], Callable[[nn.Module], float], Callable[..., tuple[Any, Tensor]]]:
    """A PINN task's training loss (mean square of the weighted residual), its error against the
    reference, and its residual Jacobian ``(G, f0)``."""

    def loss(m: nn.Module) -> Tensor:
        total, rows = 0.0, 0
        for b in problem.blocks:
            r = b.residual(m, b.inputs)
            total = total + (r * r).sum()
            rows += r.shape[0]
        return total / rows  # type: ignore[return-value]

    def error(m: nn.Module) -> float:
        return _rel(predict(m, (x_ref,), 4096), u_ref)

    def jac(m: nn.Module, space: ParameterSpace) -> tuple[Any, Tensor]:
        ops = build_operators(m, problem, space, cfg)
        return ops.G, ops.f0

    return loss, error, jac


def pde_task(name: str, config_path: Path) -> Task:
    cfg = load_config(config_path)
    base = config_path.parent
    ckpt_path = (base / str(cfg.model.checkpoint)).resolve()
    data_path = (base / str(cfg.data.path)).resolve() if cfg.data.path else None
    problem = parse_problem(cfg.pde, data_path, torch.Generator().manual_seed(cfg.seed), base)
    problem.to(DEVICE, torch.float64)
    module = cast_module(load_checkpoint(ckpt_path, cfg.model, base).module, torch.float64, DEVICE).eval()
    assert problem.reference is not None
    x_ref, u_ref = problem.reference

    loss, error, jac = _pde_methods(problem, cfg, x_ref, u_ref)

    def run_lsr() -> Any:
        ckpt = load_checkpoint(ckpt_path, cfg.model, base)
        fresh = parse_problem(cfg.pde, data_path, torch.Generator().manual_seed(cfg.seed), base)
        return refine_pde(ckpt, fresh, cfg)

    return Task(name, cfg, base, ckpt_path, module, loss, error, jac, run_lsr, _last_layer(module))


def instance_task(name: str, config_path: Path, index: int) -> Task:
    """One instance of a per-instance config (``lsr instances``): the operator network with that
    instance's inputs held fixed is a PINN for that instance's equation (no solution labels);
    errors against the instance's exact solution."""
    cfg = load_config(config_path)
    base = config_path.parent
    ckpt_path = (base / str(cfg.model.checkpoint)).resolve()
    data_path = (base / str(cfg.data.path)).resolve()
    spec, _ = parse_instances(cfg.instances, data_path)
    assert spec.reference is not None, f"{config_path}: instances.reference needed"
    x_ref = read_datasets(data_path, ["/reference/inputs"], torch.float64)["/reference/inputs"]
    u_ref = read_row(data_path, f"{spec.group}/{spec.reference}", index, torch.float64).reshape(-1, 1)

    def make_problem() -> Any:
        prob = parse_problem(cfg.pde, data_path, torch.Generator().manual_seed(cfg.seed), base, (spec.group, index))
        prob.reference = (x_ref, u_ref)
        return prob

    problem = make_problem()
    problem.to(DEVICE, torch.float64)

    def fresh() -> nn.Module:
        net = cast_module(load_checkpoint(ckpt_path, cfg.model, base).module, torch.float64, DEVICE)
        fixed = tuple(read_row(data_path, f"{spec.group}/{n}", index, torch.float64) for n in spec.inputs)
        return InstanceModel(net, fixed, spec.layout).eval()

    module = fresh()

    loss, error, jac = _pde_methods(problem, cfg, x_ref, u_ref)

    def run_lsr() -> Any:
        return refine_pde(LoadedCheckpoint(ckpt_path, "instance", fresh()), make_problem(), cfg)

    return Task(name, cfg, base, ckpt_path, module, loss, error, jac, run_lsr, _last_layer(module), fresh)


def hard_regression_task(workdir: Path, steps: int) -> Task:
    """sin(πx)sin(πy) + 0.3 cos(4πxy) on [-1, 1]², tanh MLP 64×4 trained by Adam here."""
    rng = np.random.default_rng(0)
    data = workdir / "hard.h5"

    def fn(x: np.ndarray) -> np.ndarray:
        return np.sin(np.pi * x[:, :1]) * np.sin(np.pi * x[:, 1:2]) + 0.3 * np.cos(4 * np.pi * x[:, :1] * x[:, 1:2])

    with h5py.File(data, "w") as f:
        for split, n in (("train", 4000), ("val", 1000), ("test", 2500)):
            x = rng.uniform(-1, 1, size=(n, 2))
            f[f"{split}/inputs"] = x
            f[f"{split}/targets"] = fn(x)
    torch.manual_seed(0)
    model = MLP(2, 1, hidden=[64] * 4)
    with h5py.File(data) as f:
        x = torch.tensor(f["train/inputs"][()], dtype=torch.float32)
        y = torch.tensor(f["train/targets"][()], dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=2e-5)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        opt.step()
        sched.step()
    torch.jit.script(model.eval()).save(str(workdir / "hard.pt"))
    cfg = workdir / "hard.yaml"
    cfg.write_text("model: {checkpoint: hard.pt}\ndata: {path: hard.h5}\nlsr: {rank: auto}\nseed: 0\n")
    return supervised_task("regression_hard", cfg)


# ------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------


def continued(task: Task, method: str, budget: float, marks: list[float]) -> list[tuple[float, float]]:
    if task.fresh is not None:
        module = task.fresh()
    else:
        module = cast_module(
            load_checkpoint(task.checkpoint, task.config.model, task.base).module, torch.float64, DEVICE
        )
    module.train(False)
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(True)
    opt: torch.optim.Optimizer
    if method == "adam":
        opt = torch.optim.Adam(params, lr=1e-4)
    else:
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=20, history_size=50, line_search_fn="strong_wolfe")
    curve = [(0.0, task.error(module))]
    marks = sorted(marks)
    timer = 0.0

    def closure() -> Tensor:
        opt.zero_grad()
        loss = task.loss(module)
        loss.backward()
        return loss

    while timer < budget:
        t0 = time.perf_counter()
        opt.step(closure)
        timer += time.perf_counter() - t0  # error evaluations are not charged
        if marks and timer >= marks[0]:
            curve.append((timer, task.error(module)))
            while marks and timer >= marks[0]:
                marks.pop(0)
        if not all(bool(torch.isfinite(p).all()) for p in params):
            break
    curve.append((timer, task.error(module)))
    return curve


def linear_step(task: Task, names: list[str] | None, subspace: str, rank: int) -> dict[str, Any]:
    """``δ`` from ``min ‖G δ + f0‖`` in: all parameters densely (``gauss_newton``), the last layer
    densely (``last_layer``), or a random subspace of ``rank`` columns (``random``)."""
    t0 = time.perf_counter()
    module = task.module
    named = {k: v.detach() for k, v in module.named_parameters()}
    space = ParameterSpace(named, include=names or ())
    op, f0 = task.jacobian(module, space)
    n, m = op.shape
    if subspace == "random":
        gen = torch.Generator().manual_seed(0)
        P = torch.randn(m, rank, generator=gen, dtype=torch.float64)
        P = torch.linalg.qr(P).Q
        qr = QRAccumulator(rank)
        A = op.matmat(P)
        qr.add(A, f0)
        sol = ReducedProblem.from_qr(qr).solve(rank)
        dz = P @ sol.z
    else:
        if n * m * 8 > DENSE_LIMIT:
            return {"skipped": f"J is {n} x {m} ({n * m * 8 / 1e9:.1f} GB), above {DENSE_LIMIT / 1e9:.0f} GB"}
        J = getattr(op, "J", None)
        if J is None:
            if hasattr(op, "ops"):  # a stack of residual blocks
                J = torch.cat([getattr(o, "J", None) if hasattr(o, "J") else _dense(o) for o in op.ops])
            else:
                J = _dense(op)
        t_build = time.perf_counter() - t0
        rcond = torch.finfo(torch.float64).eps * max(n, m)
        U, S, Vh = torch.linalg.svd(J, full_matrices=False)
        keep = S > rcond * S[0]
        dz = -(Vh[keep].T @ ((U[:, keep].T @ f0) / S[keep]))
    seconds = time.perf_counter() - t0
    delta = space.unflatten_vector(dz)
    err = task.error(LinearizedModel(module, delta))
    out: dict[str, Any] = {
        "error": err,
        "seconds": seconds,
        "n": n,
        "m": m,
        "rank": rank if subspace == "random" else None,
    }
    if subspace == "dense" and names is None:  # the same step by LAPACK least squares (J built once)
        for driver in ("gelsd", "gelsy"):
            t1 = time.perf_counter()
            sol = torch.linalg.lstsq(J, -f0[:, None], rcond=rcond, driver=driver).solution[:, 0]
            secs = t_build + time.perf_counter() - t1
            e = task.error(LinearizedModel(module, space.unflatten_vector(sol)))
            out[f"lstsq_{driver}"] = {"error": e, "seconds": secs}
    return out


def _dense(op: JacobianOperator) -> Tensor:
    dense, why = materialize(op, DENSE_LIMIT, torch.Generator().manual_seed(0))
    if dense is None:
        raise RuntimeError(why)
    return dense.J


def run_task(task: Task) -> dict[str, Any]:
    print(f"\n== {task.name}", flush=True)
    before = task.error(task.module)
    with no_tf32():
        t0 = time.perf_counter()
        result = task.run_lsr()
        t_first = time.perf_counter() - t0
        if t_first < WARM_RUN_LIMIT:  # time a second, warm run (see the module docstring)
            t0 = time.perf_counter()
            result = task.run_lsr()
            t_run = time.perf_counter() - t0
        else:
            t_run = t_first
        t0 = time.perf_counter()
        load_checkpoint(task.checkpoint, task.config.model, task.base)
        t_load = time.perf_counter() - t0
    # the step's time: loading the checkpoint and evaluating the errors are not charged, as they
    # are not for the other methods
    t_lsr = t_run - t_load - result.timings.get("evaluate", 0.0)
    after = task.error(result.model)
    print(
        f"lsr: {before:.3e} -> {after:.3e} at rank {result.rank} in {t_lsr:.1f} s "
        f"(first run {t_first:.1f} s; {result.jacobian})",
        flush=True,
    )
    out: dict[str, Any] = {
        "before": before,
        "lsr": {
            "error": after,
            "seconds": t_lsr,
            "first_run_seconds": t_first,
            "path": result.rounds[0].get("path", "adaptive") if result.rounds else "adaptive",
            "rank": result.rank,
            "jacobian": result.jacobian,
            "rank_sweep": [e.to_dict() for e in result.rank_sweep],
            "singular_values": result.singular_values,
            "peak_memory_bytes": result.peak_memory_bytes,
        },
    }
    for method in ("adam", "lbfgs"):
        curve = continued(task, method, 3 * t_lsr, [t_lsr * f for f in (0.25, 0.5, 1.0, 2.0)])
        at_equal = min((e for t, e in curve if t >= t_lsr), default=curve[-1][1])
        at_equal = next((e for t, e in curve if t >= t_lsr), curve[-1][1])
        out[method] = {"curve": curve, "error_at_lsr_time": at_equal, "error_at_3x": curve[-1][1]}
        print(f"{method}: at lsr time {at_equal:.3e}, at 3x {curve[-1][1]:.3e}", flush=True)
    for name, names, sub in (
        ("gauss_newton", None, "dense"),
        ("random_subspace", None, "random"),
        ("last_layer", task.last_layer, "dense"),
    ):
        try:
            with no_tf32():
                res = linear_step(task, names, sub, max(1, result.rank))
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            res = {"skipped": str(exc)[:200]}
        out[name] = res
        msg = res.get("skipped") or f"{res['error']:.3e} in {res['seconds']:.1f} s"
        print(f"{name}: {msg}", flush=True)
    return out


def merge_instances(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over instances of every error and time (the acceptance's "mean error"); curves are
    averaged point by point (their marks are the same fractions of each instance's LSR time);
    the rank sweep and spectrum are the first instance's."""

    def mean(values: list[float]) -> float:
        return float(np.mean(values))

    out: dict[str, Any] = {"instances": len(runs), "before": mean([r["before"] for r in runs])}
    lsr = dict(runs[0]["lsr"])
    for key in ("error", "seconds", "first_run_seconds", "peak_memory_bytes"):
        lsr[key] = mean([r["lsr"][key] for r in runs])
    lsr["rank"] = int(round(mean([r["lsr"]["rank"] for r in runs])))
    lsr["errors"] = [r["lsr"]["error"] for r in runs]
    out["lsr"] = lsr
    for method in ("adam", "lbfgs"):
        length = min(len(r[method]["curve"]) for r in runs)
        curve = [
            (mean([r[method]["curve"][j][0] for r in runs]), mean([r[method]["curve"][j][1] for r in runs]))
            for j in range(length)
        ]
        out[method] = {
            "curve": curve,
            "error_at_lsr_time": mean([r[method]["error_at_lsr_time"] for r in runs]),
            "error_at_3x": mean([r[method]["error_at_3x"] for r in runs]),
        }
    for key in ("gauss_newton", "random_subspace", "last_layer"):
        done = [r[key] for r in runs if "error" in r[key]]
        if len(done) < len(runs):
            out[key] = {"skipped": next(r[key]["skipped"] for r in runs if "skipped" in r[key])}
        else:
            out[key] = {"error": mean([d["error"] for d in done]), "seconds": mean([d["seconds"] for d in done])}
            for extra in ("lstsq_gelsd", "lstsq_gelsy"):
                if all(extra in d for d in done):
                    out[key][extra] = {k: mean([d[extra][k] for d in done]) for k in ("error", "seconds")}
    return out


# ------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.2e}"


def write_markdown(results: dict[str, Any], path: Path, machine: str) -> None:
    lines = [
        "# Methods from the same checkpoint",
        "",
        f"Machine: {machine}. Regenerate with `OMP_NUM_THREADS=1 python benchmarks/methods.py --out docs/benchmarks`.",
        "Relative L2 error on the test split (regression, operator) or against the reference solution (PINNs);",
        "`adam`/`lbfgs` continue training the checkpoint for the same wall time as LSR (and 3×).",
        "antiderivative: per instance (one test function's physics residual, no labels), mean over 10 of the 200 test functions.",
        "LSR is the refinement as `lsr refine` runs it (for a nonlinear PDE such as Burgers, with the exact-residual stage in its subspace); Gauss–Newton, random subspace and last layer are single linearized steps.",
        "Gauss–Newton: truncated-SVD pseudo-inverse (`torch.linalg.svd`); where listed, also `torch.linalg.lstsq` with the same rcond, drivers gelsd (SVD) and gelsy (pivoted QR, torch's CPU default), times including building J.",
        "LSR time: computing the step, warm when the first run took under a minute; loading the checkpoint and evaluating errors are charged to no method. Path: `spectral` (the held Jacobian sketched to exhaustion, every rank scored) or `adaptive` (rank grown in rounds).",
        "",
        "| task | before | LSR | LSR time | path | rank | Adam @ LSR time | L-BFGS @ LSR time | Adam @ 3× | L-BFGS @ 3× | Gauss–Newton (dense) | random subspace | last layer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        gn, rs, ll = r["gauss_newton"], r["random_subspace"], r["last_layer"]

        def cell(x: dict[str, Any]) -> str:
            if "skipped" in x:
                return "skipped"
            text = f"{_fmt(x['error'])} ({x['seconds']:.1f} s)"
            extra = [
                f"{d}: {_fmt(x[k]['error'])} ({x[k]['seconds']:.1f} s)"
                for d in ("gelsd", "gelsy")
                if (k := f"lstsq_{d}") in x
            ]
            return text + ("; lstsq " + ", ".join(extra) if extra else "")

        lines.append(
            f"| {name} | {_fmt(r['before'])} | {_fmt(r['lsr']['error'])} | {r['lsr']['seconds']:.1f} s"
            f"{'' if 'first_run_seconds' in r['lsr'] else ' †'} "
            f"| {r['lsr'].get('path', 'adaptive')} | {r['lsr']['rank']} "
            f"| {_fmt(r['adam']['error_at_lsr_time'])} | {_fmt(r['lbfgs']['error_at_lsr_time'])} "
            f"| {_fmt(r['adam']['error_at_3x'])} | {_fmt(r['lbfgs']['error_at_3x'])} | {cell(gn)} | {cell(rs)} | {cell(ll)} |"
        )
    if any("first_run_seconds" not in r["lsr"] for r in results.values()):
        lines += [
            "",
            "† a row from an earlier run, timed as it was then: the first run, checkpoint loading and error "
            "evaluation included.",
        ]
    lines += ["", "LSR's advantage at equal wall time (best of Adam / L-BFGS divided by LSR):", ""]
    for name, r in results.items():
        best = min(r["adam"]["error_at_lsr_time"], r["lbfgs"]["error_at_lsr_time"])
        lines.append(f"- {name}: {best / max(r['lsr']['error'], 1e-300):.3g}×")
    lines += [
        "",
        "LSR against the fastest dense Gauss–Newton solve (SVD, gelsd or gelsy) that reaches its error within 1.5× "
        "(time ratio LSR / Gauss–Newton; below 1: LSR faster):",
        "",
    ]
    for name, r in results.items():
        gn = r["gauss_newton"]
        if "error" not in gn:
            lines.append(f"- {name}: no dense Gauss–Newton step ({gn.get('skipped', 'skipped')[:80]})")
            continue
        solves = [("svd", gn)] + [(d, gn[f"lstsq_{d}"]) for d in ("gelsd", "gelsy") if f"lstsq_{d}" in gn]
        close = [(k, x) for k, x in solves if x["error"] <= 1.5 * r["lsr"]["error"]]
        if not close:
            lines.append(f"- {name}: no Gauss–Newton solve reaches LSR's error within 1.5×")
            continue
        k, x = min(close, key=lambda kx: kx[1]["seconds"])
        lines.append(
            f"- {name}: {r['lsr']['seconds'] / x['seconds']:.2f} ({r['lsr']['seconds']:.1f} s against {k} "
            f"{x['seconds']:.1f} s, errors {_fmt(r['lsr']['error'])} and {_fmt(x['error'])})"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    paths = []
    for name, r in results.items():
        fig = Figure(figsize=(6.4, 4.2), dpi=110, layout="constrained")
        ax = fig.add_subplot()
        for method, style in (("adam", "-o"), ("lbfgs", "-s")):
            t, e = zip(*r[method]["curve"], strict=True)
            ax.plot(np.maximum(t, 1e-2), e, style, label=method, markersize=3)
        ax.plot([max(r["lsr"]["seconds"], 1e-2)], [r["lsr"]["error"]], "r*", markersize=14, label="lsr (one-shot)")
        for key, marker in (("gauss_newton", "D"), ("random_subspace", "v"), ("last_layer", "^")):
            if "error" in r[key]:
                ax.plot([max(r[key]["seconds"], 1e-2)], [r[key]["error"]], marker, label=key.replace("_", " "))
        ax.axhline(r["before"], color="gray", lw=0.8, ls=":", label="checkpoint")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="wall time [s]",
            ylabel="relative L2 error",
            title=f"{name}: error vs time",
        )
        ax.legend(fontsize=8)
        p = out / f"{name}_error_vs_time.png"
        fig.savefig(p)
        paths.append(p)

        sweep = [e for e in r["lsr"]["rank_sweep"] if e["rank"] > 0]
        if sweep:
            sweep.sort(key=lambda e: e["rank"])
            fig = Figure(figsize=(6.4, 4.2), dpi=110, layout="constrained")
            ax = fig.add_subplot()
            ranks = [e["rank"] for e in sweep]
            ax.plot(ranks, [e["train_loss"] for e in sweep], "-o", label="train loss (linearized)")
            if any(e["val_loss"] is not None for e in sweep):
                ax.plot(ranks, [e["val_loss"] for e in sweep], "-s", label="selection loss")
            ax.plot(ranks, [e["linearized_residual"] for e in sweep], "-^", label="‖f0 + A z‖ / ‖f0‖")
            ax.axvline(r["lsr"]["rank"], color="r", ls="--", lw=0.8, label=f"chosen rank {r['lsr']['rank']}")
            ax.set(yscale="log", xlabel="rank", title=f"{name}: rank sweep")
            ax.legend(fontsize=8)
            p = out / f"{name}_rank_sweep.png"
            fig.savefig(p)
            paths.append(p)
        sv = r["lsr"]["singular_values"]
        if sv:
            fig = Figure(figsize=(6.4, 4.2), dpi=110, layout="constrained")
            ax = fig.add_subplot()
            ax.semilogy(np.arange(1, len(sv) + 1), np.maximum(sv, 1e-300))
            ax.axvline(r["lsr"]["rank"], color="r", ls="--", lw=0.8, label="chosen rank")
            ax.set(xlabel="index", ylabel="singular value", title=f"{name}: singular values of the sketch")
            ax.legend(fontsize=8)
            p = out / f"{name}_spectrum.png"
            fig.savefig(p)
            paths.append(p)
    return paths


INSTANCES = tuple(range(0, 200, 20))  # antiderivative: 10 of the 200 test instances

TASKS = {
    "regression": lambda w, s: supervised_task(
        "regression", ROOT / "configs/regression.yaml", ROOT / "sample_data/regression_torchscript.pt"
    ),
    "regression_hard": lambda w, s: hard_regression_task(w, s),
    "poisson2d": lambda w, s: pde_task("poisson2d", ROOT / "configs/poisson2d.yaml"),
    "burgers": lambda w, s: pde_task("burgers", ROOT / "configs/burgers.yaml"),
    "burgers_operator": lambda w, s: supervised_task("burgers_operator", ROOT / "configs/burgers_operator.yaml"),
    # per-instance PI-DeepONet: INSTANCES test functions spread over the 200, each its own problem
    "antiderivative": lambda w, s: [
        instance_task(f"antiderivative[{i}]", ROOT / "configs/antiderivative.yaml", i) for i in INSTANCES
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--hard-steps", type=int, default=3000, help="Adam steps of the harder regression")
    parser.add_argument("--keep", action="store_true", help="keep the other tasks of an earlier methods.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory()
    workdir = Path(tmp.name)  # the harder regression's data and checkpoint
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, Python {platform.python_version()}"
    results: dict[str, Any] = {}
    previous = args.out / "methods.json"
    if args.keep and previous.is_file():  # add to / replace tasks of an earlier run
        results = json.loads(previous.read_text())["results"]
    for name in args.tasks:
        made = TASKS[name](workdir, args.hard_steps)
        results[name] = merge_instances([run_task(t) for t in made]) if isinstance(made, list) else run_task(made)
        (args.out / "methods.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    write_markdown(results, args.out / "methods.md", machine)
    for p in write_plots(results, args.out):
        print(f"wrote {p}")
    print(f"wrote {args.out / 'methods.md'} and methods.json")


if __name__ == "__main__":
    main()
