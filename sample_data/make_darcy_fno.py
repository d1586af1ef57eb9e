"""Regenerate the Darcy FNO sample: coefficient ↦ pressure pairs and an Adam-trained 2-D FNO.

The Fourier-neural-operator benchmark scaled down to one CPU core:

    −∇·(a(x, y) ∇u) = 1 on (0, 1)²,   u = 0 on the boundary,

on a 16 × 16 grid of cells (values at the cell centres ((i + ½)/16, (j + ½)/16)). The coefficient
is piecewise constant, a = 12 where ψ ≥ 0 and a = 3 where ψ < 0, with ψ a Gaussian random field
with spectrum (4π²|k|² + 9)^(-1) (covariance (−Δ + 9)^(-2)), drawn on a 32 × 32 periodic grid
of [0, 2)² and cropped to [0, 1)² so that a is not periodic. The solver is the cell-centred
finite-volume 5-point scheme with harmonic averaging of a on interior faces and the Dirichlet
value imposed at half a cell on the boundary faces, solved by a sparse direct solve (scipy);
the script checks it on a manufactured solution u = sin(πx) sin(πy) with a = 1 + x² + y (second-
order convergence, errors printed for 16, 32, 64 cells).

Splits: 200 train, 50 val, 50 test. HDF5 layout::

    /{train,val,test}/inputs   [N, 1, 16, 16]  a at the cell centres (gzip)
    /{train,val,test}/targets  [N, 1, 16, 16]  u at the cell centres

Model: FNO2d (lsr_cli.operators) with the two coordinate channels added by the model: lift
3 → 6 channels, 3 Fourier layers of width 6 with 4 × 4 modes (positive and negative kx), GELU,
projection 6 → 16 → 1, zero padding 4 (grid 20 × 20 inside the Fourier layers): 279 real
parameters and 3 456 complex spectral weights (7 191 real numbers), plus buffers that
standardize a and u. Small on purpose, so that `lsr refine` can use ranks of a few thousand on
2 CPU cores. Trained in float32 by Adam (batch 20, lr 5e-3, cosine decay to 5e-5) for
300 epochs on the mean squared error of the standardized output.

Result (torch 2.13 CPU, one thread, about 30 s, 24 s of training): relative L2 error
(whole split / mean over samples) train 2.58e-2 / 2.86e-2, val 3.54e-2 / 3.64e-2,
test 3.34e-2 / 3.56e-2. Solver check: max errors 3.75e-3, 9.40e-4, 2.35e-4 (order 2.00).
`lsr refine` with configs/darcy_fno.yaml (matrix-free, rank 3000) measured test
3.34e-2 -> 2.75e-2 (1.22x) in 4 min 20 s on 2 cores.

Usage (from the repository root):

    OMP_NUM_THREADS=1 python sample_data/make_darcy_fno.py

Writes ``sample_data/darcy_fno.h5``, ``sample_data/darcy_fno_state_dict.pt`` and
``sample_data/darcy_fno_torchscript.pt``. Deterministic for a given torch build.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from lsr_cli.operators import FNO2d

HERE = Path(__file__).resolve().parent
GRID = 16
A_HIGH, A_LOW = 12.0, 3.0
SPLITS = {"train": 200, "val": 50, "test": 50}
MODEL_KWARGS = {
    "in_channels": 1,
    "out_channels": 1,
    "width": 6,
    "modes1": 4,
    "modes2": 4,
    "layers": 3,
    "activation": "gelu",
    "projection": 16,
    "coordinates": True,
    "padding": 4,
}


def random_coefficient(rng: np.random.Generator, n: int) -> np.ndarray:
    """Thresholded Gaussian random fields, ``[n, GRID, GRID]`` with values A_HIGH / A_LOW."""
    m = 2 * GRID  # periodic field on [0, 2)², cropped to [0, 1)²
    k = np.fft.fftfreq(m, d=2.0 / m)  # cycles per unit length
    kx, ky = np.meshgrid(k, k, indexing="ij")
    amplitude = 1.0 / (4 * np.pi**2 * (kx**2 + ky**2) + 9.0)
    noise = rng.standard_normal((n, m, m))
    psi = np.fft.ifft2(np.fft.fft2(noise) * amplitude).real[:, :GRID, :GRID]
    return np.where(psi >= 0, A_HIGH, A_LOW)


def darcy_matrix(a: np.ndarray) -> sp.csr_matrix:
    """Finite-volume matrix of −∇·(a∇u) for cell values ``a`` [s, s] on (0, 1)², u = 0 outside.

    Row ``i·s + j`` is the cell ((i + ½)h, (j + ½)h); interior faces use the harmonic mean of
    the two cells, boundary faces the cell's own value over the half-cell distance (2a/h²).
    """
    s = a.shape[0]
    h = 1.0 / s
    idx = np.arange(s * s).reshape(s, s)
    diag = np.zeros((s, s))
    rows, cols, vals = [], [], []
    for axis in (0, 1):
        a1 = np.take(a, np.arange(s - 1), axis=axis)
        a2 = np.take(a, np.arange(1, s), axis=axis)
        t = 2 * a1 * a2 / (a1 + a2) / h**2  # interior face transmissibility
        i1 = np.take(idx, np.arange(s - 1), axis=axis).ravel()
        i2 = np.take(idx, np.arange(1, s), axis=axis).ravel()
        rows += [i1, i2]
        cols += [i2, i1]
        vals += [-t.ravel(), -t.ravel()]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (0, 1)
        diag += np.pad(t, pad)
        pad[axis] = (1, 0)
        diag += np.pad(t, pad)
        for end in (0, s - 1):  # boundary faces
            sl = [slice(None), slice(None)]
            sl[axis] = slice(end, end + 1)
            diag[tuple(sl)] += 2 * a[tuple(sl)] / h**2
    rows.append(idx.ravel())
    cols.append(idx.ravel())
    vals.append(diag.ravel())
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(s * s, s * s))


def solve_darcy(a: np.ndarray, f: np.ndarray | None = None) -> np.ndarray:
    """u [s, s] at the cell centres for the coefficient ``a`` [s, s] and source ``f`` (default 1)."""
    s = a.shape[0]
    rhs = np.ones(s * s) if f is None else f.ravel()
    return np.asarray(spla.spsolve(darcy_matrix(a).tocsc(), rhs)).reshape(s, s)


def check_solver() -> None:
    """Manufactured solution u = sin(πx) sin(πy), a = 1 + x² + y: max errors and observed orders."""
    errors = []
    for s in (16, 32, 64):
        c = (np.arange(s) + 0.5) / s
        x, y = np.meshgrid(c, c, indexing="ij")
        a = 1 + x**2 + y
        sx, sy, cx, cy = np.sin(np.pi * x), np.sin(np.pi * y), np.cos(np.pi * x), np.cos(np.pi * y)
        f = -(2 * x * np.pi * cx * sy + 1.0 * np.pi * sx * cy - 2 * np.pi**2 * a * sx * sy)
        errors.append(np.abs(solve_darcy(a, f) - sx * sy).max())
    orders = [math.log2(e0 / e1) for e0, e1 in zip(errors[:-1], errors[1:], strict=True)]
    print(
        "solver check (manufactured solution): max errors "
        + ", ".join(f"{e:.2e}" for e in errors)
        + " for 16, 32, 64 cells; observed orders "
        + ", ".join(f"{o:.2f}" for o in orders)
    )


def relative_l2(model: FNO2d, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Whole-split ‖pred − y‖/‖y‖ and the mean over samples of the per-sample relative error."""
    with torch.no_grad():
        e = (model(x) - y).flatten(1)
        yf = y.flatten(1)
        whole = torch.linalg.norm(e) / torch.linalg.norm(yf)
        per = torch.linalg.norm(e, dim=1) / torch.linalg.norm(yf, dim=1)
    return whole.item(), per.mean().item()


def main() -> None:
    global GRID
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=GRID)
    parser.add_argument("--train", type=int, default=SPLITS["train"])
    parser.add_argument("--width", type=int, default=MODEL_KWARGS["width"])
    parser.add_argument("--modes", type=int, default=MODEL_KWARGS["modes1"])
    parser.add_argument("--layers", type=int, default=MODEL_KWARGS["layers"])
    parser.add_argument("--projection", type=int, default=MODEL_KWARGS["projection"])
    parser.add_argument("--padding", type=int, default=MODEL_KWARGS["padding"])
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args()
    GRID = args.grid
    SPLITS["train"] = args.train
    MODEL_KWARGS.update(
        width=args.width,
        modes1=args.modes,
        modes2=args.modes,
        layers=args.layers,
        projection=args.projection,
        padding=args.padding,
    )
    torch.set_num_threads(1)

    check_solver()
    rng = np.random.default_rng(args.seed)
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    start = time.perf_counter()
    for split, n in SPLITS.items():
        a = random_coefficient(rng, n)
        u = np.stack([solve_darcy(ai) for ai in a])
        data[split] = (a[:, None], u[:, None])
    a_train = data["train"][0]
    print(
        f"data: {time.perf_counter() - start:.1f} s; fraction a = {A_HIGH:g}: {np.mean(a_train == A_HIGH):.2f}; "
        f"max u {data['train'][1].max():.3e}"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    with h5py.File(args.out / "darcy_fno.h5", "w") as f:
        f.attrs["description"] = (
            f"Darcy FNO sample (lsr): -div(a grad u) = 1 on (0, 1)^2, u = 0 on the boundary, {GRID} x {GRID} "
            f"cell centres ((i + 1/2)/{GRID}, (j + 1/2)/{GRID}); a = {A_HIGH:g} / {A_LOW:g} from a thresholded "
            "Gaussian random field with spectrum (4 pi^2 |k|^2 + 9)^-1; cell-centred finite volumes with "
            "harmonic averaging, sparse direct solve; inputs [N, 1, H, W] a, targets [N, 1, H, W] u"
        )
        for split, (a, u) in data.items():
            grp = f.create_group(split)
            grp.create_dataset("inputs", data=a.astype(np.float64), compression="gzip", shuffle=True)
            grp.create_dataset("targets", data=u.astype(np.float64), compression="gzip", shuffle=True)

    torch.manual_seed(args.seed)
    model = FNO2d(**MODEL_KWARGS)  # type: ignore[arg-type]
    tensors = {
        split: (torch.tensor(a, dtype=torch.float32), torch.tensor(u, dtype=torch.float32))
        for split, (a, u) in data.items()
    }
    xt, yt = tensors["train"]
    model.input_shift.fill_(0.5 * (A_HIGH + A_LOW))
    model.input_scale.fill_(0.5 * (A_HIGH - A_LOW))
    model.output_shift.fill_(yt.mean().item())
    model.output_scale.fill_(yt.std().item())
    num_real = sum(p.numel() for p in model.parameters() if not p.is_complex())
    num_complex = sum(p.numel() for p in model.parameters() if p.is_complex())
    print(f"FNO2d: {num_real} real + {num_complex} complex parameters ({num_real + 2 * num_complex} real numbers)")

    batch = 20
    steps_per_epoch = xt.shape[0] // batch
    total = args.epochs * steps_per_epoch
    lr_max, lr_min = args.lr, 5e-5
    opt = torch.optim.Adam(model.parameters(), lr=lr_max)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * s / total))) / lr_max
    )
    gen = torch.Generator().manual_seed(args.seed)
    scale = model.output_scale.item()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(xt.shape[0], generator=gen)
        model.train()
        for b in range(steps_per_epoch):
            sel = perm[b * batch : (b + 1) * batch]
            opt.zero_grad()
            loss = torch.mean(((model(xt[sel]) - yt[sel]) / scale) ** 2)
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 10 == 0 or epoch == args.epochs - 1:
            model.eval()
            print(
                f"epoch {epoch:4d}  batch mse {loss.item():.3e}  val rel L2 {relative_l2(model, *tensors['val'])[0]:.3e}"
                f"  {time.perf_counter() - start:6.1f} s",
                flush=True,
            )
    model.eval()
    print(f"training: {time.perf_counter() - start:.0f} s")
    for split, t in tensors.items():
        whole, mean = relative_l2(model, *t)
        print(f"{split:5s} relative L2 error: {whole:.2e} (whole split), {mean:.2e} (mean over samples)")
    torch.save(model.state_dict(), args.out / "darcy_fno_state_dict.pt")
    torch.jit.script(model).save(str(args.out / "darcy_fno_torchscript.pt"))


if __name__ == "__main__":
    main()
