"""Regenerate the inverse-Lorenz sample: recover σ, ρ, β from noisy observations of x, y, z.

    x' = σ (y − x),   y' = x (ρ − z) − y,   z' = x y − β z,   t ∈ [0, 2],   (x, y, z)(0) = (−8, 7, 27),

true σ = 10, ρ = 28, β = 8/3. The trajectory is integrated by classical Runge–Kutta (step
1e-4, float64); the observations are x, y and z at 400 uniform random times with Gaussian noise
of 1 % of each component's standard deviation (seeded). The network keeps its estimates of
σ, ρ, β as parameters beside it (``sigma``, ``rho``, ``beta`` of the TorchScript module, initial
guesses 5, 20, 2), as PINN libraries do: an MLP 1-32×3-3, tanh, the time z-scored and the
outputs scaled by the data's standard deviations (buffers), trained with the constants in
float32 by full-batch Adam with a decaying learning rate on

    loss = mean(Σ_k r_k²) / S² + W · mean(Σ_k (q_k(0) − q_k0)²) / S² + W_DATA · mean(Σ_k (q_k − obs_k)²) / S²

over 1000 uniform random times (S = 10 keeps the terms O(1); W = 10, W_DATA = 10).

Usage (from the repository root, about 3 minutes on one core):

    OMP_NUM_THREADS=1 python sample_data/make_lorenz_inverse.py

Writes ``sample_data/lorenz_inverse.h5`` and ``sample_data/lorenz_inverse_torchscript.pt``.
Deterministic for a given torch build. Refine with ``configs/lorenz_inverse.yaml``.
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
TRUE = {"sigma": 10.0, "rho": 28.0, "beta": 8.0 / 3.0}
GUESS = {"sigma": 5.0, "rho": 20.0, "beta": 2.0}
START = np.array([-8.0, 7.0, 27.0])
T_END = 2.0
NOISE = 0.01
S = 10.0
W, W_DATA = 10.0, 10.0
HIDDEN = [32, 32, 32]


def rhs(q: np.ndarray) -> np.ndarray:
    x, y, z = q[..., 0], q[..., 1], q[..., 2]
    s, r, b = TRUE["sigma"], TRUE["rho"], TRUE["beta"]
    return np.stack([s * (y - x), x * (r - z) - y, x * y - b * z], axis=-1)


def trajectory(times: np.ndarray, dt: float = 1e-4) -> np.ndarray:
    """``[N, 3]`` at sorted-or-not ``times`` (RK4 on a fine grid, linear interpolation between)."""
    n = int(round(T_END / dt))
    grid = np.empty((n + 1, 3))
    grid[0] = START
    q = START.copy()
    for i in range(n):
        k1 = rhs(q)
        k2 = rhs(q + dt / 2 * k1)
        k3 = rhs(q + dt / 2 * k2)
        k4 = rhs(q + dt * k3)
        q = q + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        grid[i + 1] = q
    tg = np.linspace(0.0, T_END, n + 1)
    return np.stack([np.interp(times, tg, grid[:, k]) for k in range(3)], axis=1)


class LorenzPINN(nn.Module):
    """``t ↦ (x, y, z)`` and the trainable constants ``sigma``, ``rho``, ``beta`` beside it."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.net = MLP(1, 3, hidden=HIDDEN, activation="tanh")
        self.register_buffer("out_scale", scale.clone())
        self.register_buffer("out_shift", shift.clone())
        self.sigma = nn.Parameter(torch.tensor(GUESS["sigma"]))
        self.rho = nn.Parameter(torch.tensor(GUESS["rho"]))
        self.beta = nn.Parameter(torch.tensor(GUESS["beta"]))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(t) * self.out_scale + self.out_shift


def ode_residual(model: LorenzPINN, t: torch.Tensor) -> torch.Tensor:
    t = t.requires_grad_(True)
    q = model(t)
    d = torch.stack([torch.autograd.grad(q[:, k].sum(), t, create_graph=True)[0][:, 0] for k in range(3)], 1)
    x, y, z = q[:, 0], q[:, 1], q[:, 2]
    return torch.stack(
        [d[:, 0] - model.sigma * (y - x), d[:, 1] - x * (model.rho - z) + y, d[:, 2] - x * y + model.beta * z], 1
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    colloc = rng.uniform(0, T_END, size=(1000, 1))
    obs_t = rng.uniform(0, T_END, size=(400, 1))
    ref_t = np.linspace(0, T_END, 401)[:, None]
    clean = trajectory(obs_t[:, 0])
    ref = trajectory(ref_t[:, 0])
    sigma = NOISE * ref.std(axis=0)
    noisy = clean + sigma * rng.standard_normal(clean.shape)

    args.out.mkdir(parents=True, exist_ok=True)
    with h5py.File(args.out / "lorenz_inverse.h5", "w") as f:
        f.attrs["description"] = (
            "Inverse Lorenz sample (lsr): sigma = 10, rho = 28, beta = 8/3 recovered from x, y, z at 400 times "
            f"with Gaussian noise of {NOISE:.0%} of each component's std; t in [0, {T_END}], start (-8, 7, 27); "
            "1000 collocation times; reference (noise-free, RK4) at 401 times"
        )
        f["collocation/ode"] = colloc
        f["collocation/start"] = np.zeros((1, 1))
        f["observations/times"] = obs_t
        f["observations/values"] = noisy
        f["observations/clean"] = clean
        f["reference/inputs"] = ref_t
        f["reference/values"] = ref

    torch.manual_seed(args.seed)
    model = LorenzPINN(torch.tensor(ref.std(0), dtype=torch.float32), torch.tensor(ref.mean(0), dtype=torch.float32))
    tc = torch.tensor(colloc, dtype=torch.float32)
    t0 = torch.zeros(1, 1)
    q0 = torch.tensor(START, dtype=torch.float32)[None]
    to, qo = torch.tensor(obs_t, dtype=torch.float32), torch.tensor(noisy, dtype=torch.float32)
    model.net.input_shift.copy_(tc.mean(0))
    model.net.input_scale.copy_(tc.std(0))
    tr, qr = torch.tensor(ref_t, dtype=torch.float32), torch.tensor(ref, dtype=torch.float32)

    def report() -> str:
        with torch.no_grad():
            err = (torch.linalg.norm(model(tr) - qr) / torch.linalg.norm(qr)).item()
        rel = [abs(getattr(model, k).item() - v) / v for k, v in TRUE.items()]
        return f"rel L2 {err:.3e}  constants " + " ".join(
            f"{k} {getattr(model, k).item():.4f} ({r:.1e})" for k, r in zip(TRUE, rel, strict=True)
        )

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)) * 0.98 + 0.02
    )
    start = time.perf_counter()
    for step in range(args.steps):
        opt.zero_grad()
        loss_ode = ode_residual(model, tc.clone()).square().sum(1).mean() / S**2
        loss_ic = (model(t0) - q0).square().sum() / S**2
        loss_data = (model(to) - qo).square().sum(1).mean() / S**2
        loss = loss_ode + W * loss_ic + W_DATA * loss_data
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.3e}  ode {loss_ode.item():.3e}  data {loss_data.item():.3e}  "
                f"{report()}  {time.perf_counter() - start:6.1f} s",
                flush=True,
            )
    model.eval()
    print(f"Adam: {report()}")
    torch.jit.script(model).save(str(args.out / "lorenz_inverse_torchscript.pt"))


if __name__ == "__main__":
    main()
