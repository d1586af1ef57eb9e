"""Regenerate the Burgers operator data and the two Adam-trained operator nets at the LSR paper's scale.

The data-driven Burgers case of METHOD.md §4 (Cao & Zhang refine a DeepONet and a MultiONet)
at its published size:

    u_t + u u_x = ν u_xx,   x ∈ [0, 1) periodic,   ν = 0.1,   t ∈ [0, T],   T = 1,

operator u0 ↦ u(·, T) on the 128-point grid x_j = j/128 (128 sensors = 128 output points).
The protocol is that of the example notebooks in github.com/yaohua32/Deep-Neural-Operators-for-PDEs
(Examples/01_Burgers/{DeepONet,MultiONet}Cartesian_Burgers1d.ipynb: ν = 0.1, T = 1, 128 points,
1000 training and 50 test functions, Adam lr 1e-3, StepLR every 500 epochs with gamma 0.5 (their
log shows lr 5e-4 after epoch 500 and 6.25e-5 after 2000), batch 50, 2000 epochs, float32), whose
data files (viscid_train.mat / viscid_test_in.mat) are not public.

Initial conditions: the Gaussian random field of the FNO Burgers benchmark (Li et al. 2021),
N(0, 625 (−Δ + 25 I)^(−2)) on the periodic [0, 1), without its constant mode (zero mean):
u0 = Σ_{k=1..128} √(2 λ_k) (a_k cos 2πkx + b_k sin 2πkx), λ_k = 625 ((2πk)² + 25)^(−2),
a_k, b_k ~ N(0, 1) (modes above 128 hold a fraction < 1e-9 of the variance). The authors' field
is not stated in their notebooks; this is the standard Burgers-operator field with the same
ν = 0.1 setting (pointwise standard deviation of u0 ≈ 0.59). Solver: pseudo-spectral on 512
points (2/3-rule dealiasing of u u_x = ½ (u²)_x), integrating-factor RK4, dt = 5e-4; checked
against dt/2 and a 1024-point grid (printed below).

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

Result (torch 2.13 CPU, one thread, 2 cores shared with other jobs): data 71 s (u0 standard
deviation 0.58, max |u0| 2.5, max |u(T)| 0.03: e^(−4π²ν T) ≈ 0.02 damps mode 1); solver check
max |u(dt) − u(dt/2)| / max|u| = 1.9e-10, 256 vs 512 points 5.6e-16. The best affine map
u0 ↦ u(T) fitted on the training split has a validation relative L2 error of 0.076, so the
operator is far from linear at the networks' error level. Full protocol (2000 epochs, nothing
scaled), relative L2 error, whole split / mean over functions:

    model      params   time    train              val                test
    DeepONet   115 841  369 s   8.31e-3 / 9.63e-3  9.20e-3 / 1.01e-2  9.43e-3 / 1.01e-2
    MultiONet  115 844  566 s   7.30e-3 / 8.21e-3  8.69e-3 / 9.19e-3  1.06e-2 / 9.84e-3

(authors, mean over test functions: DeepONet 1.08e-2, MultiONet 7.48e-3). `lsr refine --rank 64`
with configs/burgers_paper_{deeponet,multionet}.yaml (half the parameters linearized, float64,
about 13 s of work each): mean test error DeepONet 1.01e-2 -> 4.93e-3, MultiONet 9.84e-3 -> 8.31e-3.

Usage (from the repository root):

    OMP_NUM_THREADS=1 python sample_data/make_burgers_paper.py [--only data|deeponet|multionet] [--epochs N]

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
NU = 0.1
T_FINAL = 1.0
GRID = 128
FINE = 256
DT = 5e-4
NUM_MODES = 64
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


def initial_conditions(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """``n`` draws of the GRF N(0, 625 (−Δ + 25 I)^(−2)) on the periodic [0, 1) without its constant
    mode, modes 1 ≤ k ≤ NUM_MODES, on the grid j/m; ``[n, m]``."""
    k = np.arange(1, NUM_MODES + 1)
    lam = 625.0 * ((2 * np.pi * k) ** 2 + 25.0) ** -2.0
    a = rng.standard_normal((n, NUM_MODES))
    b = rng.standard_normal((n, NUM_MODES))
    spec = np.zeros((n, m // 2 + 1), dtype=complex)
    # irfft of m √(2 λ_k)/2 (a − i b) gives √(2 λ_k) (a cos 2πkx + b sin 2πkx)
    spec[:, 1 : NUM_MODES + 1] = m * np.sqrt(2 * lam) / 2 * (a - 1j * b)
    return np.fft.irfft(spec, n=m)


def make_data(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x_grid = np.arange(GRID) / GRID
    start = time.perf_counter()
    data = {}
    for split, n in SPLITS.items():
        u0 = initial_conditions(rng, n, FINE)
        data[split] = (u0[:, :: FINE // GRID], solve_burgers(u0, T_FINAL, DT, NU)[:, :: FINE // GRID])
    print(
        f"data: {time.perf_counter() - start:.1f} s; u0 std {data['train'][0].std():.3f}, max |u0| "
        f"{np.abs(data['train'][0]).max():.2f}, max |u(T)| {np.abs(data['train'][1]).max():.2f}"
    )
    check = np.random.default_rng(seed + 1)
    u0 = initial_conditions(check, 20, 2 * FINE)
    base = solve_burgers(u0[:, ::2], T_FINAL, DT, NU)[:, :: FINE // GRID]
    half = solve_burgers(u0[:, ::2], T_FINAL, DT / 2, NU)[:, :: FINE // GRID]
    fine = solve_burgers(u0, T_FINAL, DT, NU)[:, :: 2 * FINE // GRID]
    scale = np.abs(half).max()
    print(
        f"solver check: max |u(dt) - u(dt/2)| / max|u| = {np.abs(base - half).max() / scale:.1e}; "
        f"max |u({FINE} pts) - u({2 * FINE} pts)| / max|u| = {np.abs(base - fine).max() / scale:.1e}"
    )
    u0t, utt = data["train"]
    u0v, utv = data["val"]
    coef = np.linalg.lstsq(np.c_[u0t, np.ones(len(u0t))], utt, rcond=None)[0]
    lin = np.c_[u0v, np.ones(len(u0v))] @ coef
    print(
        f"best affine map u0 -> u(T) (fitted on train): val relative L2 {np.linalg.norm(lin - utv) / np.linalg.norm(utv):.3f}"
    )
    with h5py.File(path, "w") as f:
        f.attrs["description"] = (
            f"Burgers operator at the LSR paper's scale (lsr): u0 -> u(., T), u_t + u u_x = nu u_xx, nu = {NU}, "
            f"T = {T_FINAL}, periodic x in [0, 1), {GRID}-point grid x_j = j/{GRID}; u0 ~ N(0, 625 (-Laplacian + 25 I)^-2) "
            f"without its constant mode (modes 1..{NUM_MODES}); pseudo-spectral IF-RK4 on {FINE} points, dt = {DT}; "
            f"inputs: branch [N, {GRID}] (u0 on the grid), trunk [{GRID}, 1] shared (the grid); targets [N, {GRID}] u(x_j, T)"
        )
        for split, (u0s, uts) in data.items():
            grp = f.create_group(split)
            inp = grp.create_group("inputs")
            inp.attrs["order"] = ["branch", "trunk"]
            inp.create_dataset("branch", data=u0s.astype(np.float64), compression="gzip", shuffle=True)
            trunk = inp.create_dataset("trunk", data=x_grid[:, None].astype(np.float64))
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
    model.branch.input_shift.copy_(bt.mean(0))
    model.branch.input_scale.copy_(bt.std(0))
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "burgers_paper.h5"
    if args.only in (None, "data"):
        make_data(path, args.seed)
    if args.only == "data":
        return
    data = read_data(path)
    for name in MODELS:
        if args.only in (None, name):
            train(name, data, args.epochs, args.seed, args.loss, args.out)


if __name__ == "__main__":
    main()
