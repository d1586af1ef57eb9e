"""Regenerate the inverse-Burgers sample: recover the viscosity ν from 200 noisy observations.

    u_t + u u_x − ν u_xx = 0,   x ∈ [−1, 1],   t ∈ [0, 1],   u(x, 0) = −sin(πx),   u(±1, t) = 0,

true ν = 0.05. The observations are 200 uniform random points of (x, t) with the exact value plus
Gaussian noise of 1 % of the solution's standard deviation (seeded). Exact values by the
Cole–Hopf formula

    u(x, t) = −∫ sin(π(x−η)) f(x−η) G(η) dη / ∫ f(x−η) G(η) dη,   f(y) = exp(−cos(πy)/(2πν)),

with the heat kernel G of variance 2νt, by Gauss–Hermite quadrature (the exponents shifted by
their maximum). The network keeps its estimate of ν as a parameter beside it, as PINN libraries
do (``nu`` of the TorchScript module, initial guess 0.1): an MLP 2-32×3-1, tanh, z-scored
inputs, trained with ν in float32 by full-batch Adam with a decaying learning rate on

    loss = mean(r_pde²) + W · (mean(r_ic²) + mean(r_bc²)) + W_DATA · mean((u − u_obs)²)

over 2000 random interior points, 100 initial and 100 boundary points (W = 10, W_DATA = 10).

Usage (from the repository root, about 3 minutes on one core):

    OMP_NUM_THREADS=1 python sample_data/make_burgers_inverse.py

Writes ``sample_data/burgers_inverse.h5`` and ``sample_data/burgers_inverse_torchscript.pt``.
Deterministic for a given torch build. Refine with ``configs/burgers_inverse.yaml``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from lsr_cli.models import MLP

HERE = Path(__file__).resolve().parent
NU = 0.05
NU_GUESS = 0.1
NOISE = 0.01
W, W_DATA = 10.0, 10.0
HIDDEN = [32, 32, 32]


def exact(x: np.ndarray, t: np.ndarray, nodes: int = 120) -> np.ndarray:
    """Cole–Hopf ``u`` at points ``(x, t)`` ``[N]`` (``t = 0``: the initial condition)."""
    s, w = np.polynomial.hermite.hermgauss(nodes)
    eta = np.sqrt(4 * NU * np.maximum(t, 1e-300))[:, None] * s[None, :]
    y = x[:, None] - eta
    a = np.log(w)[None, :] - np.cos(np.pi * y) / (2 * np.pi * NU)
    e = np.exp(a - a.max(axis=1, keepdims=True))
    u = -np.sum(np.sin(np.pi * y) * e, axis=1) / np.sum(e, axis=1)
    return np.where(t > 0, u, -np.sin(np.pi * x))


class InversePINN(nn.Module):
    """The network ``u(x, t)`` and the trainable viscosity ``nu`` beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP(2, 1, hidden=HIDDEN, activation="tanh")
        self.nu = nn.Parameter(torch.tensor(NU_GUESS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def pde_residual(model: InversePINN, xt: torch.Tensor) -> torch.Tensor:
    xt = xt.requires_grad_(True)
    u = model(xt)[:, 0]
    g = torch.autograd.grad(u.sum(), xt, create_graph=True)[0]
    u_x, u_t = g[:, 0], g[:, 1]
    u_xx = torch.autograd.grad(u_x.sum(), xt, create_graph=True)[0][:, 0]
    return u_t + u * u_x - model.nu * u_xx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    interior = np.stack([rng.uniform(-1, 1, 2000), rng.uniform(0, 1, 2000)], axis=1)
    initial = np.stack([rng.uniform(-1, 1, 100), np.zeros(100)], axis=1)
    boundary = np.stack([np.where(rng.uniform(size=100) < 0.5, -1.0, 1.0), rng.uniform(0, 1, 100)], axis=1)
    obs = np.stack([rng.uniform(-1, 1, 200), rng.uniform(0, 1, 200)], axis=1)
    clean = exact(obs[:, 0], obs[:, 1])
    sigma = NOISE * clean.std()
    noisy = clean + sigma * rng.standard_normal(clean.shape)
    gx, gt = np.meshgrid(np.linspace(-1, 1, 101), np.linspace(0, 1, 51), indexing="ij")
    ref_x = np.stack([gx.ravel(), gt.ravel()], axis=1)
    ref_u = exact(ref_x[:, 0], ref_x[:, 1])

    args.out.mkdir(parents=True, exist_ok=True)
    with h5py.File(args.out / "burgers_inverse.h5", "w") as f:
        f.attrs["description"] = (
            f"Inverse Burgers sample (lsr): nu = {NU} recovered from 200 observations with Gaussian noise of "
            f"{NOISE:.0%} of std(u) (sigma = {sigma:.3e}); 2000 interior, 100 initial, 100 boundary points; "
            "reference (noise-free, Cole-Hopf) on a 101 x 51 grid"
        )
        f["collocation/interior"] = interior
        f["collocation/initial"] = initial
        f["collocation/boundary"] = boundary
        f["observations/points"] = obs
        f["observations/values"] = noisy
        f["observations/clean"] = clean
        f["reference/inputs"] = ref_x
        f["reference/values"] = ref_u[:, None]

    torch.manual_seed(args.seed)
    model = InversePINN()
    xi = torch.tensor(interior, dtype=torch.float32)
    x0 = torch.tensor(initial, dtype=torch.float32)
    u0 = -torch.sin(math.pi * x0[:, 0])
    xb = torch.tensor(boundary, dtype=torch.float32)
    xo = torch.tensor(obs, dtype=torch.float32)
    uo = torch.tensor(noisy, dtype=torch.float32)
    model.net.input_shift.copy_(xi.mean(0))
    model.net.input_scale.copy_(xi.std(0))
    xr, ur = torch.tensor(ref_x, dtype=torch.float32), torch.tensor(ref_u, dtype=torch.float32)

    def error() -> float:
        with torch.no_grad():
            return (torch.linalg.norm(model(xr)[:, 0] - ur) / torch.linalg.norm(ur)).item()

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)) * 0.98 + 0.02
    )
    start = time.perf_counter()
    for step in range(args.steps):
        opt.zero_grad()
        loss_pde = pde_residual(model, xi.clone()).square().mean()
        loss_bc = (model(x0)[:, 0] - u0).square().mean() + model(xb)[:, 0].square().mean()
        loss_data = (model(xo)[:, 0] - uo).square().mean()
        loss = loss_pde + W * loss_bc + W_DATA * loss_data
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.3e}  pde {loss_pde.item():.3e}  data {loss_data.item():.3e}  "
                f"nu {model.nu.item():.5f}  rel L2 {error():.3e}  {time.perf_counter() - start:6.1f} s",
                flush=True,
            )
    model.eval()
    nu = model.nu.item()
    print(f"Adam: nu = {nu:.6f} (relative error {abs(nu - NU) / NU:.3e}), reference relative L2 error {error():.3e}")
    torch.jit.script(model).save(str(args.out / "burgers_inverse_torchscript.pt"))


if __name__ == "__main__":
    main()
