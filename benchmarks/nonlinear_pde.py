"""One-shot LSR on nonlinear PDEs it has never seen, with and without the exact-residual stage.

For each equation a 2-32×3-1 tanh PINN is trained by Adam (float64, full batch, cosine schedule)
on a manufactured solution, then refined twice from the same checkpoint by ``refine_pde`` with
the default config: ``pde.nonlinear_iterations: 0`` (LSR's linearized step only) and ``auto``
(then Levenberg–Marquardt on the refined predictor's exact residual inside LSR's subspace).
Errors are relative L2 against the exact solution on a 101 × 51 grid that no choice uses.

    OMP_NUM_THREADS=1 python benchmarks/nonlinear_pde.py [--steps 3000]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lsr_cli.checkpoint import LoadedCheckpoint
from lsr_cli.config import Config
from lsr_cli.models import MLP
from lsr_cli.pde import parse_problem, refine_pde

F64 = torch.float64
SIN = "(sin(pi*x)*exp(-t))"
COS = "(cos(pi*x)*exp(-t))"

# equation, coefficients (source = the manufactured right-hand side), exact solution, its formula
CASES: dict[str, tuple[str, dict[str, Any], Any, str]] = {
    "diffusion-reaction, u = sin(πx)e^-t": (
        "diffusion_reaction",
        {"D": 0.1, "k": 2.0, "source": f"-{SIN} + 0.1*pi**2*{SIN} - 2*{SIN}**2"},
        lambda X: torch.sin(math.pi * X[:, 0]) * torch.exp(-X[:, 1]),
        SIN,
    ),
    "Allen–Cahn, u = cos(πx)e^-t": (
        "allen_cahn",
        {"epsilon": 0.01, "gamma": 3.0, "source": f"-{COS} + 0.01*pi**2*{COS} - 3*({COS} - {COS}**3)"},
        lambda X: torch.cos(math.pi * X[:, 0]) * torch.exp(-X[:, 1]),
        COS,
    ),
    "Burgers, moving front u = 0.3 - 0.8 tanh(0.8(x - 0.3t)/0.2)": (
        "burgers",
        {"nu": 0.1},
        lambda X: 0.3 - 0.8 * torch.tanh(0.8 * (X[:, 0] - 0.3 * X[:, 1]) / 0.2),
        "(0.3 - 0.8*tanh(0.8*(x - 0.3*t)/0.2))",
    ),
}


def problem_for(equation: str, coefficients: dict[str, Any], exact: Any, formula: str, iterations: Any) -> Any:
    raw = {
        "equation": equation,
        "variables": ["x", "t"],
        "domain": {"x": [-1, 1], "t": [0, 1]},
        "coefficients": coefficients,
        "nonlinear_iterations": iterations,
        "blocks": [
            {"name": "interior", "points": {"sample": "sobol", "count": 3000}},
            {
                "name": "initial",
                "kind": "initial",
                "value": formula,
                "weight": 10,
                "points": {"sample": "sobol", "count": 200},
            },
            {
                "name": "walls",
                "kind": "dirichlet",
                "value": formula,
                "weight": 10,
                "faces": ["x_min", "x_max"],
                "points": {"sample": "sobol", "count": 200},
            },
        ],
    }
    problem = parse_problem(raw, None, torch.Generator().manual_seed(0))
    x, t = torch.meshgrid(torch.linspace(-1, 1, 101, dtype=F64), torch.linspace(0, 1, 51, dtype=F64), indexing="ij")
    X = torch.stack([x.reshape(-1), t.reshape(-1)], 1)
    problem.reference = (X, exact(X)[:, None])
    return problem


def train(problem: Any, steps: int) -> torch.nn.Module:
    torch.manual_seed(1)
    net = MLP(2, 1, hidden=[32, 32, 32]).double()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, 1e-5)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(torch.sum(b.residual(net, b.inputs) ** 2) for b in problem.blocks) / problem.num_rows
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="Adam steps of each PINN")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (equation, coefficients, exact, formula) in CASES.items():
            net = train(problem_for(equation, coefficients, exact, formula, 0), args.steps)
            path = Path(tmp) / "pinn.pt"
            torch.save(net.state_dict(), path)
            row: list[Any] = [label]
            for iterations in (0, "auto"):
                cfg = Config()
                cfg.device = "cpu"
                t0 = time.perf_counter()
                problem = problem_for(equation, coefficients, exact, formula, iterations)
                r = refine_pde(LoadedCheckpoint(path, "state_dict", net), problem, cfg)
                seconds = time.perf_counter() - t0
                e = r.errors["reference"]
                if iterations == 0:
                    row.append(e["before"]["rel_l2"])
                row += [e["after"]["rel_l2"], r.residual_loss["after"], seconds]
                print(f"{label} [{iterations}]: {e['before']['rel_l2']:.3e} -> {e['after']['rel_l2']:.3e}", flush=True)
            rows.append(row)
    print("\n| equation | Adam | LSR step only | its exact residual | s | with the stage | its exact residual | s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, before, e0, r0, s0, e1, r1, s1 in rows:
        print(f"| {label} | {before:.2e} | {e0:.2e} | {r0:.1e} | {s0:.0f} | {e1:.2e} | {r1:.1e} | {s1:.0f} |")


if __name__ == "__main__":
    main()
