"""Regenerate the Burgers PINN sample: collocation points, Cole–Hopf reference, and an Adam-trained MLP.

The paper's Burgers case (METHOD.md §4) scaled down to one CPU core:

    u_t + u u_x − ν u_xx = 0,   ν = 0.01/π,   x ∈ [−1, 1],   t ∈ [0, 1],
    u(x, 0) = −sin(πx),   u(±1, t) = 0.

The reference solution is the Cole–Hopf formula

    u(x, t) = −∫ sin(π(x−η)) f(x−η) exp(−η²/(4νt)) dη / ∫ f(x−η) exp(−η²/(4νt)) dη,
    f(y) = exp(−cos(πy)/(2πν)),

evaluated by Gauss–Hermite quadrature (η = sqrt(4νt)·s) with the exponents shifted by their
maximum (log-sum-exp) so that nothing overflows; the script checks it against a fine trapezoid
rule, at t = 0, on the boundary, and by a finite-difference PDE residual away from the shock.
Reference grid: 256 x-points × (t = 0 and 100 t-points in (0, 1]), rows t-major.
4000 uniform random interior points, 200 initial (t = 0) and 200 boundary (x = ±1, random t) points.
MLP 2-32×4-1, tanh, inputs (x, t) z-scored (buffers of the model), trained in float32 by
full-batch Adam with a decaying learning rate on

    loss = mean(r_pde²) + W · (mean(r_ic²) + mean(r_bc²)),
    r_pde = u_t + u·u_x − ν·u_xx,   r_ic = u(x, 0) + sin(πx),   r_bc = u(±1, t),

with W = 20 and the derivatives taken by torch.autograd.grad (create_graph=True).

Usage (from the repository root, about 4 minutes on one core):

    OMP_NUM_THREADS=1 python sample_data/make_burgers.py

Writes ``sample_data/burgers.h5``, ``sample_data/burgers_state_dict.pt`` and
``sample_data/burgers_torchscript.pt``. Deterministic for a given torch build.
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
NU = 0.01 / np.pi
W = 20.0
HIDDEN = [32, 32, 32, 32]


def _cole_hopf(x: np.ndarray, t: np.ndarray, eta: np.ndarray, log_w: np.ndarray) -> np.ndarray:
    """u at points (x, t) [N] from the offsets ``eta`` [N, K] with log quadrature weights [N, K] or [K]."""
    y = x[:, None] - eta
    a = log_w - np.cos(np.pi * y) / (2 * np.pi * NU)
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return -np.sum(np.sin(np.pi * y) * e, axis=1) / np.sum(e, axis=1)


def reference(x: np.ndarray, t: np.ndarray, nodes: int = 200, chunk: int = 4096) -> np.ndarray:
    """Cole–Hopf solution at the points (x[i], t[i]) by ``nodes``-point Gauss–Hermite quadrature."""
    s, w = np.polynomial.hermite.hermgauss(nodes)
    out = np.empty(x.shape[0])
    for i in range(0, x.shape[0], chunk):
        xs, ts = x[i : i + chunk], t[i : i + chunk]
        out[i : i + chunk] = _cole_hopf(xs, ts, np.sqrt(4 * NU * ts)[:, None] * s, np.log(w))
    return out


def reference_trapezoid(x: np.ndarray, t: np.ndarray, n: int = 20001, width: float = 40.0) -> np.ndarray:
    """The same integrals by a fine trapezoid rule in η (independent check of the quadrature)."""
    out = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        h = math.sqrt(4 * NU * t[i])
        eta = np.linspace(-width * h, width * h, n)
        out[i] = _cole_hopf(x[i : i + 1], t[i : i + 1], eta[None, :], -(eta**2) / h**2)[0]
    return out


def check_reference() -> None:
    """Print self-checks of the Cole–Hopf reference."""
    rng = np.random.default_rng(12345)
    x = rng.uniform(-1, 1, 200)
    t = rng.uniform(0.01, 1, 200)
    err_q = np.abs(reference(x, t) - reference_trapezoid(x, t)).max()
    err_q100 = np.abs(reference(x, t, nodes=100) - reference(x, t)).max()
    xg = np.linspace(-1, 1, 201)
    err_0 = np.abs(reference(xg, np.zeros_like(xg)) + np.sin(np.pi * xg)).max()
    tg = np.linspace(0, 1, 101)
    err_b = max(np.abs(reference(np.full_like(tg, v), tg)).max() for v in (-1.0, 1.0))
    # finite-difference PDE residual on a fine grid away from the front at x = 0
    h = 1e-3
    xf, tf = np.meshgrid(
        np.concatenate([np.linspace(-0.95, -0.3, 66), np.linspace(0.3, 0.95, 66)]),
        np.linspace(0.05, 0.95, 91),
        indexing="ij",
    )
    xf, tf = xf.ravel(), tf.ravel()
    u = reference(xf, tf)
    u_xp, u_xm = reference(xf + h, tf), reference(xf - h, tf)
    u_t = (reference(xf, tf + h) - reference(xf, tf - h)) / (2 * h)
    u_x = (u_xp - u_xm) / (2 * h)
    u_xx = (u_xp - 2 * u + u_xm) / h**2
    res = u_t + u * u_x - NU * u_xx
    scale = np.abs(u_t).max()
    print("reference self-checks:")
    print(f"  max |GH(200) - trapezoid| at 200 random points      {err_q:.2e}")
    print(f"  max |GH(100) - GH(200)|                              {err_q100:.2e}")
    print(f"  max |u(x, 0) + sin(pi x)|                            {err_0:.2e}")
    print(f"  max |u(+-1, t)|                                      {err_b:.2e}")
    print(f"  max |FD residual| for |x| >= 0.3 (max |u_t| = {scale:.2f})  {np.abs(res).max():.2e}")


def derivatives(model: torch.nn.Module, xt: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """u, u_x, u_t, u_xx at the points ``xt`` [N, 2] (columns x, t); each [N, 1]."""
    xt = xt.requires_grad_(True)
    u = model(xt)
    (du,) = torch.autograd.grad(u.sum(), xt, create_graph=True)
    (d2,) = torch.autograd.grad(du[:, 0].sum(), xt, create_graph=True)
    return u, du[:, :1], du[:, 1:2], d2[:, :1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--steps", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=str, default=",".join(map(str, HIDDEN)), help="widths, e.g. 32,32,32,32")
    parser.add_argument("--interior", type=int, default=4000, help="uniform interior points")
    parser.add_argument("--band", type=int, default=0, help="extra interior points in the front band |x| < 0.1")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    start = time.perf_counter()
    check_reference()
    rng = np.random.default_rng(args.seed)
    interior = np.stack([rng.uniform(-1, 1, args.interior), rng.uniform(0, 1, args.interior)], axis=1)
    if args.band:
        band = np.stack([rng.uniform(-0.1, 0.1, args.band), rng.uniform(0, 1, args.band)], axis=1)
        interior = np.concatenate([interior, band])
    initial = np.stack([rng.uniform(-1, 1, 200), np.zeros(200)], axis=1)
    boundary = np.stack([np.repeat([-1.0, 1.0], 100), rng.uniform(0, 1, 200)], axis=1)
    gx = np.linspace(-1, 1, 256)
    gt = np.concatenate([[0.0], np.linspace(0.01, 1, 100)])
    tt, xx = np.meshgrid(gt, gx, indexing="ij")
    ref_x = np.stack([xx.ravel(), tt.ravel()], axis=1)
    ref_u = reference(ref_x[:, 0], ref_x[:, 1])[:, None]
    print(f"reference and checks took {time.perf_counter() - start:.1f} s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    with h5py.File(args.out / "burgers.h5", "w") as f:
        f.attrs["description"] = (
            "Burgers PINN sample (lsr): u_t + u u_x - (0.01/pi) u_xx = 0 on [-1, 1] x [0, 1], "
            "u(x, 0) = -sin(pi x), u(+-1, t) = 0; reference by the Cole-Hopf formula "
            "(200-node Gauss-Hermite) on 256 x-points x 101 t-points (t = 0 and 100 in (0, 1]), t-major; "
            "4000 uniform interior + 200 initial + 200 boundary points; MLP 2-32x4-1 tanh, inputs (x, t) z-scored, "
            f"Adam float32 on mean(r_pde^2) + {W:g} * (mean(r_ic^2) + mean(r_bc^2)), "
            "r_pde = u_t + u u_x - nu u_xx, r_ic = u(x, 0) + sin(pi x), r_bc = u(+-1, t)"
        )
        f.attrs["equation"] = (
            "u_t + u u_x - nu u_xx = 0, nu = 0.01/pi, x in [-1, 1], t in [0, 1]; "
            "u(x, 0) = -sin(pi x); u(-1, t) = u(1, t) = 0"
        )
        grp = f.create_group("reference")
        grp.create_dataset("inputs", data=ref_x.astype(np.float64))
        grp.create_dataset("values", data=ref_u.astype(np.float64))
        grp = f.create_group("collocation")
        grp.create_dataset("interior", data=interior.astype(np.float64))
        grp.create_dataset("boundary", data=boundary.astype(np.float64))
        grp.create_dataset("initial", data=initial.astype(np.float64))

    torch.manual_seed(args.seed)
    hidden = [int(h) for h in args.hidden.split(",")]
    model = MLP(2, 1, hidden=hidden, activation="tanh")
    xi = torch.tensor(interior, dtype=torch.float32)
    x0 = torch.tensor(initial, dtype=torch.float32)
    u0 = -torch.sin(math.pi * x0[:, :1])
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
        u, u_x, u_t, u_xx = derivatives(model, xi.clone())
        loss_pde = torch.mean((u_t + u * u_x - NU * u_xx) ** 2)
        loss_ic = torch.mean((model(x0) - u0) ** 2)
        loss_bc = torch.mean(model(xb) ** 2)
        loss = loss_pde + W * (loss_ic + loss_bc)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.3e}  pde {loss_pde.item():.3e}  ic {loss_ic.item():.3e}  "
                f"bc {loss_bc.item():.3e}  rel L2 {rel_error():.3e}  {time.perf_counter() - start:6.1f} s",
                flush=True,
            )
    model.eval()
    print(f"reference relative L2 error of the Adam-trained model: {rel_error():.3e}")
    torch.save(model.state_dict(), args.out / "burgers_state_dict.pt")
    torch.jit.script(model).save(str(args.out / "burgers_torchscript.pt"))


if __name__ == "__main__":
    main()
