"""Regenerate the conductivity-inversion sample at three noise levels: a network outputs the
temperature u and the conductivity a(x); the data observe u only.

    −(a u')' = f on [0, 1],   u(0) = u(1) = 0,   a(0) = a(1) = 1,
    u = sin(πx),   a = 1 + 0.5 sin(2πx)   (f derived from them by hand),

the built-in ``variable_diffusion`` system (outputs u, a). The observations are u at 100 uniform
random points with Gaussian noise of 0.1 %, 1 % and 5 % of u's standard deviation (one data file
per level, the same points, seeded). For each level an MLP 1-32×3-2 (tanh, input z-scored) is
trained in float32 by full-batch Adam with a decaying learning rate on

    loss = mean(r²) + W · (mean of the four boundary conditions²) + W_DATA · mean((u − u_obs)²)

over 400 uniform random interior points (W = 10, W_DATA = 10).

Usage (from the repository root, about 4 minutes on one core):

    OMP_NUM_THREADS=1 python sample_data/make_heat_inverse.py

Writes ``sample_data/heat_inverse_{noise}.h5`` and ``sample_data/heat_inverse_{noise}_torchscript.pt``
for ``noise`` in 0.1pct, 1pct and 5pct. Refine each with ``configs/heat_inverse.yaml``:

    lsr refine sample_data/heat_inverse_5pct_torchscript.pt --config configs/heat_inverse.yaml \\
        --data sample_data/heat_inverse_5pct.h5
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
LEVELS = {"0.1pct": 0.001, "1pct": 0.01, "5pct": 0.05}
W, W_DATA = 10.0, 10.0
HIDDEN = [32, 32, 32]
PI = math.pi


def exact(x: np.ndarray) -> np.ndarray:
    """``[N, 2]``: u and a at ``x`` ``[N]``."""
    return np.stack([np.sin(PI * x), 1 + 0.5 * np.sin(2 * PI * x)], axis=1)


def source(x: torch.Tensor) -> torch.Tensor:
    """``f = −(a' u' + a u'')``."""
    a, a_x = 1 + 0.5 * torch.sin(2 * PI * x), PI * torch.cos(2 * PI * x)
    u_x, u_xx = PI * torch.cos(PI * x), -(PI**2) * torch.sin(PI * x)
    return -(a_x * u_x + a * u_xx)


def residual(model: torch.nn.Module, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    x = x.requires_grad_(True)
    q = model(x)
    u_x = torch.autograd.grad(q[:, 0].sum(), x, create_graph=True)[0][:, 0]
    a_x = torch.autograd.grad(q[:, 1].sum(), x, create_graph=True)[0][:, 0]
    u_xx = torch.autograd.grad(u_x.sum(), x, create_graph=True)[0][:, 0]
    return -(q[:, 1] * u_xx + a_x * u_x) - f


def train(name: str, noise: float, data: dict[str, np.ndarray], steps: int, seed: int, out: Path) -> None:
    torch.manual_seed(seed)
    model = MLP(1, 2, hidden=HIDDEN, activation="tanh")
    xi = torch.tensor(data["interior"], dtype=torch.float32)
    fi = source(xi[:, 0].double()).float()
    xb = torch.tensor([[0.0], [1.0]])
    xo = torch.tensor(data["obs"], dtype=torch.float32)
    uo = torch.tensor(data["values"], dtype=torch.float32)
    model.input_shift.copy_(xi.mean(0))
    model.input_scale.copy_(xi.std(0))
    xr, qr = torch.tensor(data["ref_x"], dtype=torch.float32), torch.tensor(data["ref_q"], dtype=torch.float32)

    def errors() -> str:
        with torch.no_grad():
            q = model(xr)
        e = [(torch.linalg.norm(q[:, k] - qr[:, k]) / torch.linalg.norm(qr[:, k])).item() for k in range(2)]
        return f"u rel L2 {e[0]:.3e}  a rel L2 {e[1]:.3e}"

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)) * 0.98 + 0.02)
    start = time.perf_counter()
    for step in range(steps):
        opt.zero_grad()
        q_b = model(xb)
        loss_bc = q_b[:, 0].square().mean() + (q_b[:, 1] - 1).square().mean()
        loss = residual(model, xi.clone(), fi).square().mean() + W * loss_bc
        loss = loss + W_DATA * (model(xo)[:, 0] - uo).square().mean()
        loss.backward()
        opt.step()
        sched.step()
        if step % 1000 == 0 or step == steps - 1:
            print(f"[{name}] step {step:5d}  loss {loss.item():.3e}  {errors()}  {time.perf_counter() - start:6.1f} s")
    model.eval()
    print(f"[{name}] Adam: {errors()}", flush=True)
    torch.jit.script(model).save(str(out / f"heat_inverse_{name}_torchscript.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    interior = rng.uniform(0, 1, size=(400, 1))
    obs = rng.uniform(0, 1, size=(100, 1))
    clean = exact(obs[:, 0])[:, 0]
    unit_noise = rng.standard_normal(clean.shape)  # the same draw, scaled, at every level
    ref_x = np.linspace(0, 1, 201)[:, None]
    ref_q = exact(ref_x[:, 0])
    args.out.mkdir(parents=True, exist_ok=True)
    for name, level in LEVELS.items():
        values = clean + level * clean.std() * unit_noise
        with h5py.File(args.out / f"heat_inverse_{name}.h5", "w") as f:
            f.attrs["description"] = (
                "Conductivity inversion sample (lsr): -(a u')' = f on [0, 1], u = sin(pi x), a = 1 + 0.5 sin(2 pi x); "
                f"u observed at 100 points with Gaussian noise of {level:.1%} of std(u); 400 interior points; "
                "reference u and a on 201 points"
            )
            f["collocation/interior"] = interior
            f["observations/points"] = obs
            f["observations/values"] = values
            f["observations/clean"] = clean
            f["reference/inputs"] = ref_x
            f["reference/values"] = ref_q
        data = {"interior": interior, "obs": obs, "values": values, "ref_x": ref_x, "ref_q": ref_q}
        train(name, level, data, args.steps, args.seed, args.out)


if __name__ == "__main__":
    main()
