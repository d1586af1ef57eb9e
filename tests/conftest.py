"""Shared fixtures: tiny float64 models and HDF5 files in the documented layout."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lsr_cli.models import MLP  # noqa: E402

torch.set_num_threads(1)


def make_regression_h5(
    path: Path, n_train: int = 400, n_val: int = 100, n_test: int = 100, seed: int = 0, fn=None
) -> Path:
    """``u = sin(πx)·cos(πy)`` (or ``fn``) on [-1, 1]² in the documented layout."""
    rng = np.random.default_rng(seed)
    fn = fn or (lambda x: np.sin(np.pi * x[:, :1]) * np.cos(np.pi * x[:, 1:2]))
    with h5py.File(path, "w") as f:
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            if n == 0:
                continue
            x = rng.uniform(-1, 1, size=(n, 2))
            g = f.create_group(split)
            g.create_dataset("inputs", data=x)
            g.create_dataset("targets", data=fn(x))
    return path


def train_briefly(model: torch.nn.Module, path: Path, steps: int = 1000, lr: float = 5e-3) -> torch.nn.Module:
    """Full-batch Adam on the training split (default init, seeded): a plateaued-style checkpoint."""
    with h5py.File(path, "r") as f:
        x = torch.tensor(f["train/inputs"][()], dtype=torch.float32)
        y = torch.tensor(f["train/targets"][()], dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def _regression_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("regression")
    data = make_regression_h5(root / "data.h5")
    torch.manual_seed(0)
    model = train_briefly(MLP(2, 1, hidden=[16, 16]), data)
    torch.save(model.state_dict(), root / "model_sd.pt")
    torch.jit.script(model).save(str(root / "model_ts.pt"))
    return {"data": root / "data.h5", "state_dict": root / "model_sd.pt", "torchscript": root / "model_ts.pt"}


@pytest.fixture
def regression_files(tmp_path: Path, _regression_artifacts: dict[str, Path]) -> dict[str, Path]:
    """A small HDF5 file plus an Adam-trained MLP 2-16-16-1 as state dict and TorchScript.

    Fresh copies in ``tmp_path`` for every test (the model is trained once per session).
    """
    out = {}
    for key, src in _regression_artifacts.items():
        out[key] = tmp_path / src.name
        shutil.copyfile(src, out[key])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "model:\n  factory: mlp\n  kwargs: {hidden: [16, 16]}\nlsr:\n  rank: auto\n  start_rank: 32\ndevice: cpu\n"
    )
    return {**out, "config": cfg, "dir": tmp_path}
