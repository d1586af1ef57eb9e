"""Regenerate the PI-DeepONet antiderivative sample: test instances and a physics-trained DeepONet.

The paper's "PI-DeepONet antiderivative" case (METHOD.md §4) scaled down to one CPU core: the
operator G: s ↦ u with

    u'(x) = s(x) on [0, 1],   u(0) = 0,   i.e.  u(x) = ∫_0^x s(t) dt.

Input functions are random Fourier features of a Gaussian random field with the squared-
exponential covariance exp(−(x − x')² / (2ℓ²)), ℓ = 0.2:

    s(x) = sqrt(2/K) Σ_{j=1..K} w_j cos(ω_j x + β_j),   w_j ~ N(0, 1), ω_j ~ N(0, 1/ℓ²), β_j ~ U(0, 2π),

K = 64, so that the antiderivative is exact:
u(x) = sqrt(2/K) Σ_j w_j x cos(ω_j x/2 + β_j) sinc(ω_j x/2), with sinc(z) = sin(z)/z (the script
checks it against a cumulative trapezoid rule on 20 001 points). The branch input is s at the
m = 100 sensors linspace(0, 1, 100).

Model: DeepONet (lsr_cli.operators, layout "paired": branch [N, 100], trunk [N, 1] → [N, 1]),
branch 100-64×3-64, trunk 1-64×3-64, tanh, output bias: 31 553 parameters, inputs z-scored by
the model's buffers. Trained in float32 by Adam (lr 1e-3, cosine decay to 2e-5) on the physics
loss only, no solution labels:

    loss = mean over (i, x) of (∂u_i/∂x(x) − s_i(x))²  +  mean over i of u_i(0)²,

for 1000 training functions; each step draws 100 functions and 50 uniform random collocation
points per function (s evaluated exactly from its Fourier features); ∂u/∂x by torch.autograd.
The branch network is evaluated once per function and its output repeated for the function's
points, which equals the paired forward with repeated branch rows.

Test instances (200 functions never seen in training), HDF5 layout::

    /sensors                 [100, 1]  the sensor locations
    /collocation/interior    [200, 1]  shared collocation points x_j = (j + ½)/200
    /collocation/origin      [1, 1]    the point x = 0
    /instances/branch        [200, 100]  s_i at the sensors
    /instances/source        [200, 200]  s_i at /collocation/interior (right-hand side)
    /reference/inputs        [200, 1]  linspace(0, 1, 200)
    /instances/reference     [200, 200]  exact u_i at /reference/inputs

Result (torch 2.13 CPU, one thread, about 5.5 minutes, 329 s of training with the other core
busy): mean over the test instances of the relative L2 error on /reference/inputs 5.2e-3, max
2.1e-2 (the paper had 3.7e-3); final physics loss 7.2e-5. Antiderivative check: 4.3e-9.

Usage (from the repository root):

    OMP_NUM_THREADS=1 python sample_data/make_antiderivative.py

Writes ``sample_data/antiderivative.h5``, ``sample_data/antiderivative_state_dict.pt`` and
``sample_data/antiderivative_torchscript.pt``. Deterministic for a given torch build.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from lsr_cli.operators import DeepONet

HERE = Path(__file__).resolve().parent
LENGTH_SCALE = 0.2
NUM_FEATURES = 64
NUM_SENSORS = 100
NUM_TRAIN, NUM_TEST = 1000, 200
NUM_INTERIOR, NUM_REFERENCE = 200, 200
BATCH_FUNCTIONS, BATCH_POINTS = 100, 50
MODEL_KWARGS = {
    "branch_features": NUM_SENSORS,
    "trunk_features": 1,
    "width": 64,
    "depth": 3,
    "basis": 64,
    "activation": "tanh",
    "layout": "paired",
}


def random_features(rng: np.random.Generator, n: int) -> np.ndarray:
    """Fourier features ``[n, K, 3]`` = (w, ω, β) of ``n`` input functions."""
    w = rng.standard_normal((n, NUM_FEATURES))
    omega = rng.standard_normal((n, NUM_FEATURES)) / LENGTH_SCALE
    beta = rng.uniform(0.0, 2 * np.pi, size=(n, NUM_FEATURES))
    return np.stack([w, omega, beta], axis=-1)


def source(features: np.ndarray, x: np.ndarray) -> np.ndarray:
    """s_i(x) for ``features`` [n, K, 3] at the points ``x`` [P]; returns [n, P]."""
    w, omega, beta = (features[..., i][:, :, None] for i in range(3))
    return math.sqrt(2 / NUM_FEATURES) * np.sum(w * np.cos(omega * x + beta), axis=1)


def antiderivative(features: np.ndarray, x: np.ndarray) -> np.ndarray:
    """u_i(x) = ∫_0^x s_i, exact, for ``features`` [n, K, 3] at ``x`` [P]; returns [n, P]."""
    w, omega, beta = (features[..., i][:, :, None] for i in range(3))
    half = omega * x / 2
    # ∫_0^x cos(ωt + β) dt = x cos(ωx/2 + β) sinc(ωx/2); np.sinc(t) = sin(πt)/(πt)
    return math.sqrt(2 / NUM_FEATURES) * np.sum(w * x * np.cos(half + beta) * np.sinc(half / np.pi), axis=1)


def check_antiderivative(features: np.ndarray) -> None:
    """Exact antiderivative vs a cumulative trapezoid rule on 20 001 points."""
    x = np.linspace(0.0, 1.0, 20001)
    s = source(features, x)
    trap = np.concatenate([np.zeros((s.shape[0], 1)), np.cumsum((s[:, 1:] + s[:, :-1]) / 2 * np.diff(x), axis=1)], 1)
    exact = antiderivative(features, x)
    print(f"antiderivative check: max |exact - trapezoid| = {np.abs(exact - trap).max():.1e} (trapezoid error ~h²)")


def predict(model: DeepONet, branch: Tensor, x: Tensor) -> Tensor:
    """u_i(x_j) for ``branch`` [n, m] and shared points ``x`` [P, 1] by the paired forward; [n, P]."""
    n, p = branch.shape[0], x.shape[0]
    return model(branch.repeat_interleave(p, dim=0), x.repeat(n, 1)).reshape(n, p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--steps", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    rng = np.random.default_rng(args.seed)
    sensors = np.linspace(0.0, 1.0, NUM_SENSORS)
    interior = (np.arange(NUM_INTERIOR) + 0.5) / NUM_INTERIOR
    ref_x = np.linspace(0.0, 1.0, NUM_REFERENCE)
    train_feat = random_features(rng, NUM_TRAIN)
    test_feat = random_features(rng, NUM_TEST)
    check_antiderivative(test_feat[:20])
    test_branch = source(test_feat, sensors)
    test_source = source(test_feat, interior)
    test_ref = antiderivative(test_feat, ref_x)

    args.out.mkdir(parents=True, exist_ok=True)
    with h5py.File(args.out / "antiderivative.h5", "w") as f:
        f.attrs["description"] = (
            "PI-DeepONet antiderivative sample (lsr): u' = s on [0, 1], u(0) = 0; s = sqrt(2/K) sum_j w_j "
            f"cos(omega_j x + beta_j), K = {NUM_FEATURES}, w ~ N(0, 1), omega ~ N(0, 1/{LENGTH_SCALE}^2), "
            "beta ~ U(0, 2 pi) (squared-exponential GRF, length scale 0.2); "
            f"{NUM_TEST} test instances; branch = s at {NUM_SENSORS} sensors linspace(0, 1); "
            "DeepONet layout paired (branch [N, 100], trunk [N, 1] -> [N, 1])"
        )
        f.attrs["equation"] = "du/dx(x) - s(x) = 0 on /collocation/interior; u(0) = 0 on /collocation/origin"
        f.create_dataset("sensors", data=sensors[:, None])
        grp = f.create_group("collocation")
        grp.create_dataset("interior", data=interior[:, None])
        grp.create_dataset("origin", data=np.zeros((1, 1)))
        grp = f.create_group("instances")
        grp.create_dataset("branch", data=test_branch)
        grp.create_dataset("source", data=test_source)
        grp.create_dataset("reference", data=test_ref)
        grp = f.create_group("reference")
        grp.create_dataset("inputs", data=ref_x[:, None])

    torch.manual_seed(args.seed)
    model = DeepONet(**MODEL_KWARGS)  # type: ignore[arg-type]
    train_branch = torch.tensor(source(train_feat, sensors), dtype=torch.float32)
    w, omega, beta = (torch.tensor(train_feat[..., i], dtype=torch.float32) for i in range(3))
    model.branch.input_shift.copy_(train_branch.mean(0))
    model.branch.input_scale.copy_(train_branch.std(0))
    model.trunk.input_shift.fill_(0.5)
    model.trunk.input_scale.fill_(1 / math.sqrt(12))  # std of U(0, 1)
    print(f"DeepONet: {sum(p.numel() for p in model.parameters())} parameters")

    xr = torch.tensor(ref_x[:, None], dtype=torch.float32)
    tb = torch.tensor(test_branch, dtype=torch.float32)
    tr = torch.tensor(test_ref, dtype=torch.float32)

    def test_error() -> tuple[float, float]:
        with torch.no_grad():
            e = torch.linalg.norm(predict(model, tb, xr) - tr, dim=1) / torch.linalg.norm(tr, dim=1)
        return e.mean().item(), e.max().item()

    lr_max, lr_min = 1e-3, 2e-5
    opt = torch.optim.Adam(model.parameters(), lr=lr_max)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * s / args.steps))) / lr_max
    )
    gen = torch.Generator().manual_seed(args.seed)
    zero = torch.zeros(BATCH_FUNCTIONS, 1)
    scale = math.sqrt(2 / NUM_FEATURES)
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(NUM_TRAIN, (BATCH_FUNCTIONS,), generator=gen)
        x = torch.rand(BATCH_FUNCTIONS, BATCH_POINTS, generator=gen)  # [F, P]
        s = scale * torch.sum(w[idx, :, None] * torch.cos(omega[idx, :, None] * x[:, None, :] + beta[idx, :, None]), 1)
        xt = x.reshape(-1, 1).requires_grad_(True)
        opt.zero_grad()
        b = model.branch(train_branch[idx])  # [F, p]
        u = (b.repeat_interleave(BATCH_POINTS, dim=0) * model.trunk(xt)).sum(1, keepdim=True) + model.bias
        (du,) = torch.autograd.grad(u.sum(), xt, create_graph=True)
        loss_pde = torch.mean((du.reshape(BATCH_FUNCTIONS, BATCH_POINTS) - s) ** 2)
        u0 = (b * model.trunk(zero)).sum(1) + model.bias
        loss_ic = torch.mean(u0**2)
        loss = loss_pde + loss_ic
        loss.backward()
        opt.step()
        sched.step()
        if step % 2000 == 0 or step == args.steps - 1:
            mean, worst = test_error()
            print(
                f"step {step:5d}  loss {loss.item():.3e}  pde {loss_pde.item():.3e}  ic {loss_ic.item():.3e}  "
                f"test rel L2 mean {mean:.3e} max {worst:.3e}  {time.perf_counter() - start:6.1f} s",
                flush=True,
            )
    model.eval()
    mean, worst = test_error()
    print(f"training: {time.perf_counter() - start:.0f} s")
    print(f"test relative L2 error of the Adam-trained model: mean {mean:.2e}, max {worst:.2e} (paper: 3.7e-3)")
    torch.save(model.state_dict(), args.out / "antiderivative_state_dict.pt")
    torch.jit.script(model).save(str(args.out / "antiderivative_torchscript.pt"))


if __name__ == "__main__":
    main()
