"""Regenerate the Burgers operator data and the two Adam-trained operator nets at the LSR paper's scale.

The data-driven Burgers case of METHOD.md §4 (Cao & Zhang refine a DeepONet and a MultiONet)
at its published size:

    u_t + u u_x = ν u_xx,   x ∈ [−1, 1],   u(−1, t) = u(1, t) = 0,   ν = 0.1/π,   t ∈ [0, T],   T = 1,

operator u0 ↦ u(·, T) on the 128-point grid linspace(−1, 1, 128) (128 sensors = 128 output points).
The protocol is that of the example notebooks in github.com/yaohua32/Deep-Neural-Operators-for-PDEs
(Examples/01_Burgers/{DeepONet,MultiONet}Cartesian_Burgers1d.ipynb: T = 1, 128 points,
1000 training and 50 test functions, Adam lr 1e-3, StepLR every 500 epochs with gamma 0.5 (their
log shows lr 5e-4 after epoch 500 and 6.25e-5 after 2000), batch 50, 2000 epochs, float32), whose
data files (viscid_train.mat / viscid_test_in.mat) are not public.

The setting is read from those notebooks, not from their introduction's "ν = 0.1, x ∈ (0, 1)":
their figures plot u0 and u(·, 1) over x ∈ [−1, 1], zero at both ends, u0 of size ~0.5 and
u(·, 1) of size ~0.07–0.3 (one to three waves), and the physics-informed notebook that loads the
same file uses ν = 0.1/π with a factor cos(πx/2) that vanishes at x = ±1. (An earlier version of
this script took ν = 0.1 on the periodic [0, 1): there e^(−4π²ν) ≈ 0.02 leaves u(·, 1) almost one
Fourier mode of size 0.01, and `lsr` gains were limited by generalization near rank 3 000.)

Initial conditions: u0 = Σ_{k=1..128} c_k sin(kπx), c_k ~ N(0, s² (τ² + (kπ)²)^(−α)), τ = 7,
α = 2.5, s = 70.14: the FNO-style field on [−1, 1] with Dirichlet ends, the parameters of a
published regeneration of these files (pointwise standard deviation of u0 ≈ 0.38, as the
original data's). The sine series is odd and 2-periodic and Burgers keeps it so, so the Dirichlet
problem is solved as the periodic one on [−1, 1): pseudo-spectral on 512 points (2/3-rule
dealiasing of u u_x = ½ (u²)_x), integrating-factor RK4, dt = 5e-4, evaluated at the output grid
by trigonometric interpolation; the values at x = ±1 are set to exactly 0. Checked against dt/2
and a 1024-point grid (printed below).

Splits: 1000 train, 100 val (extra functions for `lsr`'s rank selection), 50 test. HDF5 layout as
sample_data/burgers_operator.h5 (float64, gzip)::

    /{train,val,test}/inputs            group, attribute order = ["branch", "trunk"]
    /{train,val,test}/inputs/branch     [N, 128]  u0 at the grid
    /{train,val,test}/inputs/trunk      [128, 1]  the grid points x_j; attribute shared = True
    /{train,val,test}/targets           [N, 128]  u(x_j, T)

Models (lsr_cli.operators, layout "cartesian", tanh, inputs z-scored by the models' buffers with
the training split's per-sensor mean/std):
- DeepONet(width=128, depth=3, basis=128): branch 128-128-128-128-128, trunk 1-128-128-128-128
  (the notebook's [128, 128×4] / [1, 128×4]), 115 841 parameters.
- MultiONet(width=128, depth=3): the notebook's hidden_list = [128]*3, inner products of the 3
  hidden layers averaged, 115 844 parameters.
Training: float32, torch seed 0, Adam lr 1e-3, StepLR(500, 0.5) per epoch, 2000 epochs of 20
shuffled batches of 50. Loss: the notebooks' "mse_org", which is the mean over the batch of the
per-function L2 norm of the error, ‖u_pred − u‖₂ (not squared); ``--loss mse`` uses the mean
squared error instead.

Result (torch 2.13 CPU, one thread, the two models trained side by side on the 2 cores): data 78 s
(u0 standard deviation 0.376, max |u0| 1.71; u(T) standard deviation 0.187, max |u(T)| 0.69);
solver check max |u(dt) − u(dt/2)| / max|u| = 7.0e-12, 512 vs 1024 points 1.2e-15. The best
affine map u0 ↦ u(T) fitted on the training split has a validation relative L2 error of 0.335.
Full protocol (2000 epochs, nothing scaled), relative L2 error, whole split / mean over functions:

    model      params   time    train              val                test
    DeepONet   115 841  163 s   9.77e-3 / 1.13e-2  1.12e-2 / 1.23e-2  1.87e-2 / 1.62e-2
    MultiONet  115 844  210 s   1.03e-2 / 1.20e-2  1.34e-2 / 1.34e-2  1.73e-2 / 1.80e-2

(authors, mean over test functions: DeepONet 1.08e-2, MultiONet 7.48e-3).

Usage (from the repository root):

    OMP_NUM_THREADS=1 python sample_data/make_burgers_paper.py [--only data|deeponet|multionet] [--epochs N]

Two options make data for sensitivity studies, not the shipped file (docs/benchmarks/paper_operators.md):
``--alpha A`` draws the field with exponent A, s set so that u0 keeps its pointwise spread;
``--extra-train N`` appends N training functions from their own stream (seed + 2), so the
validation and test functions stay the shipped ones. Use them with ``--out DIR``.

Writes ``sample_data/burgers_paper.h5`` and ``sample_data/burgers_paper_{deeponet,multionet}_
{torchscript,state_dict}.pt``. Deterministic for a given torch build.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from lsr_cli.operators import DeepONet, MultiONet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_burgers_operator import solve_burgers  # noqa: E402  (the same solver, ν an argument)

HERE = Path(__file__).resolve().parent
NU = 0.1 / np.pi
T_FINAL = 1.0
GRID = 128
FINE = 512
DT = 5e-4
NUM_MODES = 128
GRF_S, GRF_TAU, GRF_ALPHA = 70.14, 7.0, 2.5
X_GRID = np.linspace(-1.0, 1.0, GRID)  # the sensors and output points (the trunk input)
SPLITS = {"train": 1000, "val": 100, "test": 50}
MODELS: dict[str, tuple[type[nn.Module], dict[str, object]]] = {
    "deeponet": (
        DeepONet,
        {"branch_features": GRID, "trunk_features": 1, "width": 128, "depth": 3, "basis": 128, "activation": "tanh"},
    ),
    "multionet": (
        MultiONet,
        {"branch_features": GRID, "trunk_features": 1, "width": 128, "depth": 3, "activation": "tanh"},
    ),
}


def sine_series(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``Σ_k coef[:, k-1] sin(kπx)`` at the points ``x``; ``[n, len(x)]``."""
    k = np.arange(1, coef.shape[1] + 1)
    return coef @ np.sin(np.pi * np.outer(k, x))


def mode_decay(alpha: float) -> np.ndarray:
    """``(τ² + (kπ)²)^(−α/2)`` for 1 ≤ k ≤ NUM_MODES: the coefficients' standard deviations up to the scale ``s``."""
    k = np.arange(1, NUM_MODES + 1)
    return (GRF_TAU**2 + (k * np.pi) ** 2) ** (-alpha / 2)


def field_scale(alpha: float) -> float:
    """The ``s`` that gives the field of exponent ``alpha`` the pointwise spread of the shipped one (α = 2.5, s = 70.14)."""
    if alpha == GRF_ALPHA:
        return GRF_S
    return GRF_S * float(np.sqrt(np.sum(mode_decay(GRF_ALPHA) ** 2) / np.sum(mode_decay(alpha) ** 2)))


def initial_coefficients(rng: np.random.Generator, n: int, alpha: float = GRF_ALPHA) -> np.ndarray:
    """``n`` draws of the sine coefficients c_k ~ N(0, s² (τ² + (kπ)²)^(−α)), 1 ≤ k ≤ NUM_MODES; ``[n, NUM_MODES]``."""
    std = field_scale(alpha) * mode_decay(alpha)
    return rng.standard_normal((n, NUM_MODES)) * std


def fourier_interpolate(u: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The trigonometric interpolant of ``u`` [n, M] (the periodic grid −1 + 2j/M) at the points ``x``."""
    m = u.shape[1]
    v = np.fft.rfft(u) / m
    n = np.arange(m // 2 + 1)
    w = np.full(n.shape, 2.0)
    w[0] = 1.0
    w[-1] = 1.0  # the Nyquist mode counts once
    phase = np.exp(1j * np.pi * np.outer(n, x + 1.0))  # angular wavenumber nπ on the period 2
    return np.real((v * w) @ phase)


def solve_on_grid(coef: np.ndarray, points: int, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """u0 and u(·, T) at the output grid for sine coefficients ``coef``, solved on ``points`` periodic points.

    The sine series is odd and 2-periodic, and Burgers keeps it so: the periodic solution on [−1, 1)
    vanishes at x = ±1 and is the Dirichlet solution. Values at x = ±1 are set to exactly 0.
    """
    x_solver = -1.0 + 2.0 * np.arange(points) / points
    u_end = solve_burgers(sine_series(coef, x_solver), T_FINAL, dt, NU, length=2.0)
    u0 = sine_series(coef, X_GRID)
    ut = fourier_interpolate(u_end, X_GRID)
    for u in (u0, ut):
        u[:, [0, -1]] = 0.0
    return u0, ut


def make_data(path: Path, seed: int, alpha: float = GRF_ALPHA, extra_train: int = 0) -> None:
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    data = {split: solve_on_grid(initial_coefficients(rng, n, alpha), FINE, DT) for split, n in SPLITS.items()}
    if extra_train:  # more training functions from their own stream: val and test stay the shipped ones
        extra = solve_on_grid(initial_coefficients(np.random.default_rng(seed + 2), extra_train, alpha), FINE, DT)
        (u0_train, ut_train), (u0_extra, ut_extra) = data["train"], extra
        data["train"] = (np.concatenate([u0_train, u0_extra]), np.concatenate([ut_train, ut_extra]))
    print(
        f"data: {time.perf_counter() - start:.1f} s; u0 std {data['train'][0].std():.3f}, max |u0| "
        f"{np.abs(data['train'][0]).max():.2f}, u(T) std {data['train'][1].std():.3f}, "
        f"max |u(T)| {np.abs(data['train'][1]).max():.2f}"
    )
    coef = initial_coefficients(np.random.default_rng(seed + 1), 20, alpha)
    base = solve_on_grid(coef, FINE, DT)[1]
    half = solve_on_grid(coef, FINE, DT / 2)[1]
    fine = solve_on_grid(coef, 2 * FINE, DT)[1]
    scale = np.abs(half).max()
    print(
        f"solver check: max |u(dt) - u(dt/2)| / max|u| = {np.abs(base - half).max() / scale:.1e}; "
        f"max |u({FINE} pts) - u({2 * FINE} pts)| / max|u| = {np.abs(base - fine).max() / scale:.1e}"
    )
    u0t, utt = data["train"]
    u0v, utv = data["val"]
    lin_coef = np.linalg.lstsq(np.c_[u0t, np.ones(len(u0t))], utt, rcond=None)[0]
    lin = np.c_[u0v, np.ones(len(u0v))] @ lin_coef
    print(
        f"best affine map u0 -> u(T) (fitted on train): val relative L2 {np.linalg.norm(lin - utv) / np.linalg.norm(utv):.3f}"
    )
    with h5py.File(path, "w") as f:
        f.attrs["description"] = (
            f"Burgers operator at the LSR paper's scale (lsr): u0 -> u(., T), u_t + u u_x = nu u_xx, nu = 0.1/pi, "
            f"T = {T_FINAL}, x in [-1, 1], u(-1, t) = u(1, t) = 0, {GRID}-point grid linspace(-1, 1, {GRID}); "
            f"u0 = sum_k c_k sin(k pi x), c_k ~ N(0, s^2 (tau^2 + (k pi)^2)^-alpha), s = {field_scale(alpha):.6g}, "
            f"tau = {GRF_TAU}, alpha = {alpha}, k = 1..{NUM_MODES}; pseudo-spectral IF-RK4 on the 2-periodic odd extension, "
            f"{FINE} points, dt = {DT}; inputs: branch [N, {GRID}] (u0 on the grid), trunk [{GRID}, 1] shared (the grid); "
            f"targets [N, {GRID}] u(x_j, T)"
        )
        for split, (u0s, uts) in data.items():
            grp = f.create_group(split)
            inp = grp.create_group("inputs")
            inp.attrs["order"] = ["branch", "trunk"]
            inp.create_dataset("branch", data=u0s.astype(np.float64), compression="gzip", shuffle=True)
            trunk = inp.create_dataset("trunk", data=X_GRID[:, None].astype(np.float64))
            trunk.attrs["shared"] = True
            grp.create_dataset("targets", data=uts.astype(np.float64), compression="gzip", shuffle=True)


def read_data(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = {}
    with h5py.File(path, "r") as f:
        for split in SPLITS:
            g = f[split]
            out[split] = tuple(
                torch.tensor(np.asarray(a), dtype=torch.float32)
                for a in (g["inputs/branch"], g["inputs/trunk"], g["targets"])
            )
    return out  # type: ignore[return-value]


def relative_l2(
    model: nn.Module, branch: torch.Tensor, trunk: torch.Tensor, target: torch.Tensor
) -> tuple[float, float]:
    """Whole-split ‖pred − target‖/‖target‖ and the mean over functions of the per-function relative error."""
    with torch.no_grad():
        e = model(branch, trunk) - target
        whole = torch.linalg.norm(e) / torch.linalg.norm(target)
        per = torch.linalg.norm(e, dim=1) / torch.linalg.norm(target, dim=1)
    return whole.item(), per.mean().item()


def train(name: str, data: dict, epochs: int, seed: int, loss_kind: str, out: Path) -> None:
    cls, kwargs = MODELS[name]
    torch.manual_seed(seed)
    model = cls(**kwargs)
    bt, xt, yt = data["train"]
    # the sensors at x = ±1 are always 0 (Dirichlet): z-score them by 1, not by their zero spread
    spread = bt.std(0)
    model.branch.input_shift.copy_(bt.mean(0))
    model.branch.input_scale.copy_(torch.where(spread > 0, spread, torch.ones_like(spread)))
    model.trunk.input_shift.copy_(xt.mean(0))
    model.trunk.input_scale.copy_(xt.std(0))
    num_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {num_params} parameters", flush=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=500, gamma=0.5)
    gen = torch.Generator().manual_seed(seed)
    batch = 50
    start = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(bt.shape[0], generator=gen)
        total = 0.0
        for i in range(0, bt.shape[0], batch):
            idx = perm[i : i + batch]
            err = model(bt[idx], xt) - yt[idx]
            loss = torch.linalg.norm(err, dim=1).mean() if loss_kind == "l2" else torch.mean(err**2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        sched.step()
        if epoch == 0:
            print(f"  first epoch {time.perf_counter() - start:.2f} s", flush=True)
        if (epoch + 1) % 100 == 0 or epoch == epochs - 1:
            print(
                f"  epoch {epoch + 1:5d}  train loss {total / (bt.shape[0] // batch):.3e}  "
                f"test mean rel L2 {relative_l2(model, *data['test'])[1]:.3e}  {time.perf_counter() - start:6.1f} s",
                flush=True,
            )
    model.eval()
    print(f"{name}: training {time.perf_counter() - start:.0f} s for {epochs} epochs")
    for split, t in data.items():
        whole, mean = relative_l2(model, *t)
        print(f"  {split:5s} relative L2 error: {whole:.3e} (whole split), {mean:.3e} (mean over functions)")
    torch.save(model.state_dict(), out / f"burgers_paper_{name}_state_dict.pt")
    torch.jit.script(model).save(str(out / f"burgers_paper_{name}_torchscript.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--only", choices=["data", "deeponet", "multionet"])
    parser.add_argument("--epochs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", choices=["l2", "mse"], default="l2")
    parser.add_argument(
        "--alpha",
        type=float,
        default=GRF_ALPHA,
        help=f"the field's exponent (default {GRF_ALPHA}); s is set to keep u0's pointwise spread. A sensitivity study, not the shipped data",
    )
    parser.add_argument(
        "--extra-train",
        type=int,
        default=0,
        help="append this many training functions (their own seed; val and test unchanged). A sensitivity study",
    )
    args = parser.parse_args()
    if args.extra_train < 0:
        parser.error(f"--extra-train: expected a count of functions >= 0, got {args.extra_train}")
    if (args.alpha != GRF_ALPHA or args.extra_train) and args.out.resolve() == HERE:
        parser.error(
            "--alpha and --extra-train make data for a sensitivity study: give --out DIR, not the shipped files"
        )
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "burgers_paper.h5"
    if args.only in (None, "data"):
        make_data(path, args.seed, args.alpha, args.extra_train)
    if args.only == "data":
        return
    data = read_data(path)
    for name in MODELS:
        if args.only in (None, name):
            train(name, data, args.epochs, args.seed, args.loss, args.out)


if __name__ == "__main__":
    main()
