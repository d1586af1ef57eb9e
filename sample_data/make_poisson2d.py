"""Regenerate the Poisson 2D PINN sample: collocation points, reference, and an Adam-trained MLP.

The paper's Poisson case (METHOD.md §4) scaled down to one CPU core:
−Δu = f on [0, 1]² with exact solution u = sin(π(2x)²)·sin(πy) = sin(4πx²)·sin(πy), so

    f = −Δu = −(8π cos(4πx²) − 64π²x² sin(4πx²))·sin(πy) + π² sin(4πx²)·sin(πy),

and homogeneous Dirichlet data u = 0 on all four faces (the exact solution vanishes there).
2000 uniform random interior points, 400 boundary points (100 per face, uniform along the face),
reference on a 64 × 64 grid. MLP 2-32×3-1, tanh, inputs z-scored (buffers of the model), trained
in float32 by full-batch Adam with a decaying learning rate on

    loss = mean(r_pde²) + W_BC · mean(r_bc²),   r_pde = −(u_xx + u_yy) − f,   r_bc = u − 0,

with W_BC = 100 and the derivatives taken by torch.autograd.grad (create_graph=True).

Usage (from the repository root, about 4 minutes on one core):

    OMP_NUM_THREADS=1 python sample_data/make_poisson2d.py

Writes ``sample_data/poisson2d.h5``, ``sample_data/poisson2d_state_dict.pt`` and
``sample_data/poisson2d_torchscript.pt``. Deterministic for a given torch build.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from lsr_cli.models import MLP

HERE = Path(__file__).resolve().parent
W_BC = 100.0
HIDDEN = [32, 32, 32]


def exact(x: np.ndarray) -> np.ndarray:
    """u(x, y) = sin(4πx²)·sin(πy), shape [N, 1]."""
    return np.sin(4 * np.pi * x[:, :1] ** 2) * np.sin(np.pi * x[:, 1:2])


def source(x: np.ndarray) -> np.ndarray:
    """f = −Δu for the exact solution, shape [N, 1]."""
    px, py = x[:, :1], x[:, 1:2]
    s, c = np.sin(4 * np.pi * px**2), np.cos(4 * np.pi * px**2)
    u_xx = (8 * np.pi * c - 64 * np.pi**2 * px**2 * s) * np.sin(np.pi * py)
    u_yy = -(np.pi**2) * s * np.sin(np.pi * py)
    return -(u_xx + u_yy)


def boundary_points(rng: np.random.Generator, per_face: int) -> np.ndarray:
    """``per_face`` uniform random points on each face of [0, 1]²: x=0, x=1, y=0, y=1."""
    faces = []
    for axis in (0, 1):
        for value in (0.0, 1.0):
            p = np.empty((per_face, 2))
            p[:, axis] = value
            p[:, 1 - axis] = rng.uniform(0.0, 1.0, size=per_face)
            faces.append(p)
    return np.concatenate(faces, axis=0)


def pde_residual(model: torch.nn.Module, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """r = −(u_xx + u_yy) − f at the points ``x`` [N, 2]; returns [N, 1]."""
    x = x.requires_grad_(True)
    u = model(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2x,) = torch.autograd.grad(du[:, 0].sum(), x, create_graph=True)
    (d2y,) = torch.autograd.grad(du[:, 1].sum(), x, create_graph=True)
    return -(d2x[:, :1] + d2y[:, 1:2]) - f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--steps", type=int, default=24000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    rng = np.random.default_rng(args.seed)
    interior = rng.uniform(0.0, 1.0, size=(2000, 2))
    boundary = boundary_points(rng, 100)
    g = np.linspace(0.0, 1.0, 64)
    gx, gy = np.meshgrid(g, g, indexing="ij")
    ref_x = np.stack([gx.ravel(), gy.ravel()], axis=1)
    ref_u = exact(ref_x)
    print(f"max |u_exact| on the boundary points: {np.abs(exact(boundary)).max():.2e}")

    args.out.mkdir(parents=True, exist_ok=True)
    with h5py.File(args.out / "poisson2d.h5", "w") as f:
        f.attrs["description"] = (
            "Poisson 2D PINN sample (lsr): -Lap u = f on [0, 1]^2, u = 0 on the boundary, "
            "exact u = sin(4 pi x^2) sin(pi y); 2000 uniform interior + 400 boundary points "
            "(100 per face), reference on a 64 x 64 grid; MLP 2-32x3-1 tanh, z-scored inputs, "
            f"Adam float32 on mean(r_pde^2) + {W_BC:g} * mean(r_bc^2), "
            "r_pde = -(u_xx + u_yy) - f, r_bc = u"
        )
        f.attrs["equation"] = (
            "-(u_xx + u_yy) = f, f = -(8 pi cos(4 pi x^2) - 64 pi^2 x^2 sin(4 pi x^2)) sin(pi y) "
            "+ pi^2 sin(4 pi x^2) sin(pi y); u = 0 on the boundary of [0, 1]^2"
        )
        grp = f.create_group("reference")
        grp.create_dataset("inputs", data=ref_x.astype(np.float64))
        grp.create_dataset("values", data=ref_u.astype(np.float64))
        grp = f.create_group("collocation")
        grp.create_dataset("interior", data=interior.astype(np.float64))
        grp.create_dataset("boundary", data=boundary.astype(np.float64))

    torch.manual_seed(args.seed)
    model = MLP(2, 1, hidden=HIDDEN, activation="tanh")
    xi = torch.tensor(interior, dtype=torch.float32)
    fi = torch.tensor(source(interior), dtype=torch.float32)
    xb = torch.tensor(boundary, dtype=torch.float32)
    model.input_shift.copy_(xi.mean(0))
    model.input_scale.copy_(xi.std(0))
    xr = torch.tensor(ref_x, dtype=torch.float32)
    ur = torch.tensor(ref_u, dtype=torch.float32)

    def rel_error() -> float:
        with torch.no_grad():
            return (torch.linalg.norm(model(xr) - ur) / torch.linalg.norm(ur)).item()

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)) * 0.95 + 0.05
    )
    start = time.perf_counter()
    for step in range(args.steps):
        opt.zero_grad()
        loss_pde = torch.mean(pde_residual(model, xi.clone(), fi) ** 2)
        loss_bc = torch.mean(model(xb) ** 2)
        loss = loss_pde + W_BC * loss_bc
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.3e}  pde {loss_pde.item():.3e}  "
                f"bc {loss_bc.item():.3e}  rel L2 {rel_error():.3e}  {time.perf_counter() - start:6.1f} s",
                flush=True,
            )
    model.eval()
    print(f"reference relative L2 error of the Adam-trained model: {rel_error():.3e}")
    torch.save(model.state_dict(), args.out / "poisson2d_state_dict.pt")
    torch.jit.script(model).save(str(args.out / "poisson2d_torchscript.pt"))


if __name__ == "__main__":
    main()
