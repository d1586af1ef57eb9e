"""Write a small file in PDEBench's 1-D layout and a DeepONet trained on it.

PDEBench (Takamoto et al., 2022) ships one HDF5 file per equation and parameter, with no split
groups: the 1-D advection files hold

    /tensor         [N, T, X]   float32, u(t_i, x_j) for N initial conditions
    /x-coordinate   [X]         cell centres of the periodic domain [0, 1)
    /t-coordinate   [T + 1]     the time levels (one more than the tensor holds)

(the real files are N = 10 000, T = 201, X = 1024, 3.3 GB). This script writes the same layout,
small: u_t + β u_x = 0 with β = 0.4 on [0, 1) periodic, solved exactly (u(t, x) = u0(x − βt)),
initial conditions random Fourier series (modes 1..3, amplitudes ∝ 1/k), N = 240, T = 11
(t ∈ [0, 1]), X = 64: about 0.6 MB.

The operator to learn: u(0, ·) ↦ u(1, ·) (a shift by 0.4), read with
``inputs: [/tensor[:, 0], /x-coordinate[:, None]]`` (the grid shared by every sample) and
``targets: /tensor[:, -1]``; configs/pdebench_operator.yaml splits the samples 0.8 / 0.1 / 0.1
(seeded). The DeepONet (lsr_cli.operators, cartesian, branch 64-32-32, trunk 1-32-32, basis 32,
6 369 parameters) is trained by Adam (lr 3e-3, cosine decay) on the training rows of that split
only (2 000 steps, about 10 s), and saved
as a state dict and as a ``torch.export`` program (``.pt2``, dynamic batch).

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python sample_data/make_pdebench_like.py

Writes ``sample_data/pdebench_advection.h5``, ``sample_data/pdebench_advection_state_dict.pt``
and ``sample_data/pdebench_advection.pt2``. Deterministic for a given torch build.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np
import torch

from lsr_cli.config import load_config
from lsr_cli.data import split_rows
from lsr_cli.operators import DeepONet

BETA = 0.4
NUM_SAMPLES, NUM_TIMES, NUM_POINTS = 240, 11, 64
MODES = 3
KWARGS = dict(branch_features=NUM_POINTS, trunk_features=1, width=32, depth=2, basis=32, activation="tanh")


def make_data(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = (np.arange(NUM_POINTS) + 0.5) / NUM_POINTS
    t = np.linspace(0.0, 1.0, NUM_TIMES + 1)
    k = np.arange(1, MODES + 1)
    a = rng.standard_normal((NUM_SAMPLES, MODES)) / k
    b = rng.standard_normal((NUM_SAMPLES, MODES)) / k
    phase = 2 * np.pi * k[None, None, :] * (x[None, :, None] - BETA * t[:NUM_TIMES, None, None])  # [T, X, K]
    u = np.einsum("nk,txk->ntx", a, np.cos(phase)) + np.einsum("nk,txk->ntx", b, np.sin(phase))
    with h5py.File(path, "w") as f:
        f.create_dataset("tensor", data=u.astype(np.float32), compression="gzip")
        f.create_dataset("x-coordinate", data=x.astype(np.float32))
        f.create_dataset("t-coordinate", data=t.astype(np.float32))
        f.attrs["beta"] = BETA


def train(path: Path, config: Path, steps: int = 2000) -> DeepONet:
    cfg = load_config(config)
    with h5py.File(path, "r") as f:
        u = np.asarray(f["tensor"])
        x = np.asarray(f["x-coordinate"])
    assert cfg.data.split is not None
    rows = split_rows(u.shape[0], cfg.data.split, str(path))["train"][0]  # the rows lsr trains on
    branch = torch.tensor(u[rows, 0])
    trunk = torch.tensor(x[:, None])
    target = torch.tensor(u[rows, -1])
    torch.manual_seed(0)
    model = DeepONet(**KWARGS)
    with torch.no_grad():
        model.branch.input_shift.copy_(branch.mean(0))
        model.branch.input_scale.copy_(branch.std(0))
        model.trunk.input_shift.copy_(trunk.mean(0))
        model.trunk.input_scale.copy_(trunk.std(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.mean((model(branch, trunk) - target) ** 2)
        loss.backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        rel = float(torch.linalg.norm(model(branch, trunk) - target) / torch.linalg.norm(target))
    print(f"trained: relative L2 error on the training rows {rel:.2e}")
    return model.eval()


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=here)
    parser.add_argument("--config", type=Path, default=here.parent / "configs" / "pdebench_operator.yaml")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = args.out / "pdebench_advection.h5"
    make_data(data)
    model = train(data, args.config)
    torch.save(model.state_dict(), args.out / "pdebench_advection_state_dict.pt")
    example = (torch.zeros(5, NUM_POINTS), torch.linspace(0, 1, NUM_POINTS)[:, None])
    auto = torch.export.Dim.AUTO
    program = torch.export.export(model, example, dynamic_shapes=({0: auto}, {0: auto}))
    torch.export.save(program, str(args.out / "pdebench_advection.pt2"))
    print(f"wrote {data} ({data.stat().st_size / 1e6:.2f} MB), the state dict and the .pt2 program")


if __name__ == "__main__":
    main()
