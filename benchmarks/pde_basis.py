"""``pde.basis: auto`` (the exact spectral path on a small linear PDE) against ``output`` (the
adaptive path on the output-Jacobian sketch), from the same Adam-trained PINN.

Three linear problems not among the shipped samples (heat 1-D with initial and wall blocks,
Helmholtz k = 5 with inhomogeneous walls, Poisson 3-D), a 32×32 tanh MLP trained here by 1500
full-batch Adam steps, relative L2 error against the exact solution on 4000 random points.
Not a test.

    OMP_NUM_THREADS=1 python benchmarks/pde_basis.py      # ~1 min on one core
"""

import math
import tempfile
import time
from pathlib import Path

import torch

from lsr_cli.checkpoint import LoadedCheckpoint
from lsr_cli.config import Config
from lsr_cli.models import MLP
from lsr_cli.pde import parse_problem, refine_pde

tmp = tempfile.TemporaryDirectory()
PI = math.pi
problems = {
    "heat1d": (
        {
            "equation": "heat",
            "variables": ["x", "t"],
            "domain": {"x": [0, 1], "t": [0, 1]},
            "coefficients": {"kappa": 0.1},
            "blocks": [
                {"name": "int", "points": {"sample": "sobol", "count": 1000}},
                {
                    "name": "walls",
                    "kind": "dirichlet",
                    "value": 0,
                    "weight": 10,
                    "points": {"sample": "boundary", "count": 100},
                },
                {
                    "name": "ic",
                    "kind": "initial",
                    "value": "sin(pi*x)",
                    "weight": 10,
                    "points": {"sample": "sobol", "count": 100},
                },
            ],
        },
        lambda X: torch.exp(-0.1 * PI**2 * X[:, 1]) * torch.sin(PI * X[:, 0]),
        2,
    ),
    "helmholtz": (
        {
            "equation": "helmholtz",
            "variables": ["x", "y"],
            "domain": {"x": [-1, 1], "y": [-1, 1]},
            "coefficients": {"k": 5.0, "source": 0.0},
            "blocks": [
                {"name": "int", "points": {"sample": "sobol", "count": 1000}},
                {
                    "name": "walls",
                    "kind": "dirichlet",
                    "value": "sin(3*x)*cos(4*y)",
                    "weight": 10,
                    "points": {"sample": "boundary", "count": 200},
                },
            ],
        },
        lambda X: torch.sin(3 * X[:, 0]) * torch.cos(4 * X[:, 1]),
        2,
    ),
    "poisson3d": (
        {
            "equation": "poisson",
            "variables": ["x", "y", "z"],
            "domain": {"x": [0, 1], "y": [0, 1], "z": [0, 1]},
            "coefficients": {"source": "3*pi**2*sin(pi*x)*sin(pi*y)*sin(pi*z)"},
            "blocks": [
                {"name": "int", "points": {"sample": "sobol", "count": 1500}},
                {
                    "name": "walls",
                    "kind": "dirichlet",
                    "value": 0,
                    "weight": 10,
                    "points": {"sample": "boundary", "count": 300},
                },
            ],
        },
        lambda X: torch.sin(PI * X[:, 0]) * torch.sin(PI * X[:, 1]) * torch.sin(PI * X[:, 2]),
        3,
    ),
}
for name, (raw, exact, d) in problems.items():
    prob = parse_problem(raw, None, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    net = MLP(d, 1, hidden=[32, 32]).double()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(1500):
        opt.zero_grad()
        loss = sum(torch.sum(b.residual(net, b.inputs) ** 2) for b in prob.blocks) / prob.num_rows
        loss.backward()
        opt.step()
    net.eval()
    path = Path(tmp.name) / f"{name}.pt"
    torch.save(net.state_dict(), path)
    g = torch.Generator().manual_seed(7)
    Xr = torch.rand(4000, d, generator=g, dtype=torch.float64)
    lo = torch.tensor([v[0] for v in raw["domain"].values()], dtype=torch.float64)
    hi = torch.tensor([v[1] for v in raw["domain"].values()], dtype=torch.float64)
    Xr = lo + (hi - lo) * Xr
    for basis in ("auto", "output"):
        p = parse_problem(dict(raw, basis=basis), None, torch.Generator().manual_seed(1))
        p.reference = (Xr, exact(Xr)[:, None])
        cfg = Config()
        cfg.device = "cpu"
        t = time.perf_counter()
        r = refine_pde(LoadedCheckpoint(path, "state_dict", net), p, cfg)
        ref = r.errors["reference"]
        print(
            f"{name:10s} {basis:6s} G {r.num_residuals}x{r.num_linearized_parameters} {ref['before']['rel_l2']:.2e} -> {ref['after']['rel_l2']:.2e} rank {r.rank} {r.selection_metric} {time.perf_counter() - t:.1f}s",
            flush=True,
        )
