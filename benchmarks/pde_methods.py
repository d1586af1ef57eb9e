"""From the same PINN checkpoint: one-shot LSR vs continued Adam vs continued L-BFGS, same time.

    python benchmarks/pde_methods.py [--config configs/poisson2d.yaml] [--threads 2] [--json PATH]

Runs one-shot LSR on the physics residual (``lsr_cli.pde.refine_pde``) and measures its wall
time T; then continues training the checkpoint for the same T with Adam and with
``torch.optim.LBFGS`` (strong Wolfe), float64, on the same weighted residual loss and points,
and prints the reference error against time for each. With ``--iterations N`` it also runs
``lsr iterate`` (N outer iterations; the network's own error after each) and gives Adam and
L-BFGS that longer time as well. Not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lsr_cli import load_checkpoint, load_config
from lsr_cli.pde import parse_problem, refine_pde
from lsr_cli.pde.problem import PdeProblem
from lsr_cli.refine import predict

ROOT = Path(__file__).resolve().parents[1]


def reference_error(module: torch.nn.Module, problem: PdeProblem) -> float:
    assert problem.reference is not None
    x, u = problem.reference
    with torch.no_grad():
        pred = predict(module, (x,), 4096).reshape(u.shape)
    return float(torch.linalg.norm(pred - u) / torch.linalg.norm(u))


def loss_fn(module: torch.nn.Module, problem: PdeProblem) -> torch.Tensor:
    total, rows = 0.0, 0
    for b in problem.blocks:
        r = b.residual(module, b.inputs)
        total = total + (r * r).sum()
        rows += r.shape[0]
    return total / rows


def continue_training(name: str, config: Path, budget: float, checkpoints: list[float]) -> list[tuple[float, float]]:
    cfg = load_config(config)
    problem = parse_problem(cfg.pde, _data(cfg, config), torch.Generator().manual_seed(0), config.parent)
    module = load_checkpoint(_ckpt(cfg, config), cfg.model, config.parent).module.double()
    problem.to(torch.device("cpu"), torch.float64)
    params = [p for p in module.parameters()]
    opt: torch.optim.Optimizer
    if name == "adam":
        opt = torch.optim.Adam(params, lr=1e-4)
    else:
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=20, history_size=50, line_search_fn="strong_wolfe")
    curve = [(0.0, reference_error(module, problem))]
    start = time.perf_counter()
    marks = list(checkpoints)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(module, problem)
        loss.backward()
        return loss

    while True:
        opt.step(closure)
        elapsed = time.perf_counter() - start
        if marks and elapsed >= marks[0]:
            curve.append((elapsed, reference_error(module, problem)))
            marks.pop(0)
        if elapsed >= budget:
            curve.append((elapsed, reference_error(module, problem)))
            return curve


def _data(cfg, config: Path) -> Path:
    return (config.parent / cfg.data.path).resolve()


def _ckpt(cfg, config: Path) -> Path:
    return (config.parent / cfg.model.checkpoint).resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "poisson2d.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--iterations", type=int, default=0, help="also run lsr iterate for N iterations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    cfg.device = "cpu"
    problem = parse_problem(cfg.pde, _data(cfg, args.config), torch.Generator().manual_seed(0), args.config.parent)
    t0 = time.perf_counter()
    result = refine_pde(load_checkpoint(_ckpt(cfg, args.config), cfg.model, args.config.parent), problem, cfg)
    t_lsr = time.perf_counter() - t0
    ref = result.errors["reference"]
    rows = {"one-shot LSR": [(0.0, ref["before"]["rel_l2"]), (t_lsr, ref["after"]["rel_l2"])]}
    budget = t_lsr
    if args.iterations:
        from lsr_cli.pde.iterate import iterate

        cfg.iterate.iterations = args.iterations
        problem = parse_problem(cfg.pde, _data(cfg, args.config), torch.Generator().manual_seed(0), args.config.parent)
        curve = [(0.0, ref["before"]["rel_l2"])]
        t1 = time.perf_counter()
        iterate(
            load_checkpoint(_ckpt(cfg, args.config), cfg.model, args.config.parent),
            problem,
            cfg,
            on_iteration=lambda e: curve.append((time.perf_counter() - t1, e["reference_rel_l2"]["network"])),
        )
        rows["lsr iterate (network)"] = curve
        budget = curve[-1][0]
    marks = [budget * f for f in (0.25, 0.5, 0.75)]
    for name in ("adam", "lbfgs"):
        rows[f"continued {name}"] = continue_training(name, args.config, budget, marks)
    print(f"config {args.config.name}; torch {torch.__version__}; {args.threads} threads; float64\n")
    print("| method | seconds | reference rel L2 |")
    print("|---|---|---|")
    for name, curve in rows.items():
        for t, e in curve:
            print(f"| {name} | {t:.1f} | {e:.3e} |")
    final = {name: curve[-1][1] for name, curve in rows.items()}
    print("\nat equal wall time:", ", ".join(f"{k} {v:.3e}" for k, v in final.items()))
    if args.json:
        args.json.write_text(json.dumps({"seconds": budget, "curves": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
