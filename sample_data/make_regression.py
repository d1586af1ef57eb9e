"""Regenerate the regression sample: data, and an Adam-trained tanh MLP in two formats.

The paper's function-approximation case (METHOD.md §4) scaled down to 2 CPU cores:
u(x, y) = sin(πx)·sin(πy) on [-1, 1]², 5000 uniform random points split 80/20 into
train/val, test on a 50 × 50 grid; MLP 2-64×4-1 (12 737 parameters) with z-scored inputs,
trained in float32 by full-batch Adam with a decaying learning rate.

Usage (from the repository root, about a minute on 2 cores):

    python sample_data/make_regression.py

Writes ``sample_data/regression.h5``, ``sample_data/regression_state_dict.pt`` and
``sample_data/regression_torchscript.pt``. Deterministic for a given torch build.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import h5py
import numpy as np
import torch

from lsr_cli.models import MLP

HERE = Path(__file__).resolve().parent


def target(x: np.ndarray) -> np.ndarray:
    return np.sin(np.pi * x[:, :1]) * np.sin(np.pi * x[:, 1:2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    rng = np.random.default_rng(args.seed)
    points = rng.uniform(-1.0, 1.0, size=(5000, 2))
    train_x, val_x = points[:4000], points[4000:]
    g = np.linspace(-1.0, 1.0, 50)
    gx, gy = np.meshgrid(g, g, indexing="ij")
    test_x = np.stack([gx.ravel(), gy.ravel()], axis=1)

    args.out.mkdir(parents=True, exist_ok=True)
    with h5py.File(args.out / "regression.h5", "w") as f:
        f.attrs["description"] = "u = sin(pi x) sin(pi y) on [-1, 1]^2 (lsr regression sample)"
        for split, x in [("train", train_x), ("val", val_x), ("test", test_x)]:
            grp = f.create_group(split)
            grp.create_dataset("inputs", data=x.astype(np.float64))
            grp.create_dataset("targets", data=target(x).astype(np.float64))

    torch.manual_seed(args.seed)
    model = MLP(2, 1, hidden=[64, 64, 64, 64], activation="tanh")
    xt = torch.tensor(train_x, dtype=torch.float32)
    yt = torch.tensor(target(train_x), dtype=torch.float32)
    model.input_shift.copy_(xt.mean(0))
    model.input_scale.copy_(xt.std(0))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)) * 0.95 + 0.05
    )
    for step in range(args.steps):
        opt.zero_grad()
        loss = torch.mean((model(xt) - yt) ** 2)
        loss.backward()
        opt.step()
        sched.step()
        if step % 1000 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  train mse {loss.item():.3e}")
    model.eval()
    with torch.no_grad():
        xs = torch.tensor(test_x, dtype=torch.float32)
        ys = torch.tensor(target(test_x), dtype=torch.float32)
        rel = torch.linalg.norm(model(xs) - ys) / torch.linalg.norm(ys)
    print(f"test relative L2 error of the Adam-trained model: {rel.item():.3e}")
    torch.save(model.state_dict(), args.out / "regression_state_dict.pt")
    torch.jit.script(model).save(str(args.out / "regression_torchscript.pt"))


if __name__ == "__main__":
    main()
