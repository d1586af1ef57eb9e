"""Regenerate the Kovasznay-flow PINN sample: steady 2-D Navier–Stokes, three outputs (u, v, p).

Kovasznay's exact solution of the steady incompressible Navier–Stokes equations (density 1,
ν = 1/Re, Re = 20) on [−0.5, 1] × [−0.5, 1.5]:

    u = 1 − e^{λx} cos(2πy),   v = λ/(2π) e^{λx} sin(2πy),   p = ½ (1 − e^{2λx}),
    λ = Re/2 − sqrt(Re²/4 + 4π²),

residuals (the built-in ``navier_stokes`` system)

    momentum_x = u u_x + v u_y + p_x − ν Δu,   momentum_y = u v_x + v v_y + p_y − ν Δv,
    continuity = u_x + v_y,

u and v given on the four walls, p on the outflow wall x = 1 (the pressure's level).
1500 uniform random interior points, 100 points per wall, reference on a 41 × 41 grid
(columns u, v, p). MLP 2-32×3-3, tanh, inputs z-scored (buffers of the model), trained in
float32 by full-batch Adam with a decaying learning rate on

    loss = mean(momentum_x² + momentum_y² + continuity²) + W · (mean(r_u²) + mean(r_v²) + mean(r_p²))

with W = 10 and the derivatives taken by torch.autograd.grad (create_graph=True).

Usage (from the repository root, about 4 minutes on one core):

    OMP_NUM_THREADS=1 python sample_data/make_kovasznay.py

Writes ``sample_data/kovasznay.h5`` and ``sample_data/kovasznay_torchscript.pt``.
Deterministic for a given torch build. Refine with ``configs/kovasznay.yaml``.
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
RE = 20.0
NU = 1.0 / RE
LAM = RE / 2 - math.sqrt(RE**2 / 4 + 4 * math.pi**2)
LO, HI = (-0.5, -0.5), (1.0, 1.5)
W = 10.0
HIDDEN = [32, 32, 32]


def exact(xy: np.ndarray) -> np.ndarray:
    """``[N, 3]``: u, v, p of Kovasznay's flow at ``xy`` ``[N, 2]``."""
    x, y = xy[:, 0], xy[:, 1]
    e = np.exp(LAM * x)
    u = 1 - e * np.cos(2 * np.pi * y)
    v = LAM / (2 * np.pi) * e * np.sin(2 * np.pi * y)
    p = 0.5 * (1 - np.exp(2 * LAM * x))
    return np.stack([u, v, p], axis=1)


def wall_points(rng: np.random.Generator, per_wall: int) -> np.ndarray:
    """``per_wall`` uniform random points on each wall: x = lo, x = hi, y = lo, y = hi."""
    walls = []
    for axis in (0, 1):
        for value in (LO[axis], HI[axis]):
            p = np.empty((per_wall, 2))
            p[:, axis] = value
            p[:, 1 - axis] = rng.uniform(LO[1 - axis], HI[1 - axis], size=per_wall)
            walls.append(p)
    return np.concatenate(walls, axis=0)


def residuals(model: torch.nn.Module, xy: torch.Tensor) -> torch.Tensor:
    """``[N, 3]``: the momentum and continuity residuals at ``xy``."""
    xy = xy.requires_grad_(True)
    q = model(xy)
    grads = [torch.autograd.grad(q[:, k].sum(), xy, create_graph=True)[0] for k in range(3)]
    (u_x, u_y), (v_x, v_y), (p_x, p_y) = ((g[:, 0], g[:, 1]) for g in grads)
    u_xx = torch.autograd.grad(u_x.sum(), xy, create_graph=True)[0][:, 0]
    u_yy = torch.autograd.grad(u_y.sum(), xy, create_graph=True)[0][:, 1]
    v_xx = torch.autograd.grad(v_x.sum(), xy, create_graph=True)[0][:, 0]
    v_yy = torch.autograd.grad(v_y.sum(), xy, create_graph=True)[0][:, 1]
    u, v = q[:, 0], q[:, 1]
    return torch.stack(
        [
            u * u_x + v * u_y + p_x - NU * (u_xx + u_yy),
            u * v_x + v * v_y + p_y - NU * (v_xx + v_yy),
            u_x + v_y,
        ],
        dim=1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    interior = rng.uniform(LO, HI, size=(1500, 2))
    walls = wall_points(rng, 100)
    outflow = walls[100:200]  # x = 1
    gx, gy = np.meshgrid(np.linspace(LO[0], HI[0], 41), np.linspace(LO[1], HI[1], 41), indexing="ij")
    ref_x = np.stack([gx.ravel(), gy.ravel()], axis=1)

    args.out.mkdir(parents=True, exist_ok=True)
    with h5py.File(args.out / "kovasznay.h5", "w") as f:
        f.attrs["description"] = (
            "Kovasznay-flow PINN sample (lsr): steady incompressible Navier-Stokes, Re = 20, on "
            "[-0.5, 1] x [-0.5, 1.5]; 1500 interior points, 100 per wall (u, v on every wall, p on x = 1); "
            "reference u, v, p on a 41 x 41 grid; MLP 2-32x3-3 tanh, Adam float32"
        )
        f["collocation/interior"] = interior
        f["collocation/walls"] = walls
        f["collocation/outflow"] = outflow
        f["reference/inputs"] = ref_x
        f["reference/values"] = exact(ref_x)

    torch.manual_seed(args.seed)
    model = MLP(2, 3, hidden=HIDDEN, activation="tanh")
    xi = torch.tensor(interior, dtype=torch.float32)
    xw = torch.tensor(walls, dtype=torch.float32)
    uvw = torch.tensor(exact(walls)[:, :2], dtype=torch.float32)
    xo = torch.tensor(outflow, dtype=torch.float32)
    po = torch.tensor(exact(outflow)[:, 2], dtype=torch.float32)
    model.input_shift.copy_(xi.mean(0))
    model.input_scale.copy_(xi.std(0))
    xr = torch.tensor(ref_x, dtype=torch.float32)
    ur = torch.tensor(exact(ref_x), dtype=torch.float32)

    def velocity_error() -> float:
        with torch.no_grad():
            return (torch.linalg.norm(model(xr)[:, :2] - ur[:, :2]) / torch.linalg.norm(ur[:, :2])).item()

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)) * 0.98 + 0.02
    )
    start = time.perf_counter()
    for step in range(args.steps):
        opt.zero_grad()
        loss_pde = residuals(model, xi.clone()).square().sum(1).mean()
        loss_bc = (model(xw)[:, :2] - uvw).square().sum(1).mean() + (model(xo)[:, 2] - po).square().mean()
        loss = loss_pde + W * loss_bc
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.3e}  pde {loss_pde.item():.3e}  bc {loss_bc.item():.3e}  "
                f"velocity rel L2 {velocity_error():.3e}  {time.perf_counter() - start:6.1f} s",
                flush=True,
            )
    model.eval()
    print(f"velocity relative L2 error of the Adam-trained model: {velocity_error():.3e}")
    torch.jit.script(model).save(str(args.out / "kovasznay_torchscript.pt"))


if __name__ == "__main__":
    main()
