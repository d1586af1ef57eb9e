"""``lsr refine`` on checkpoints saved by real libraries, the way their users save them.

- **neuraloperator** (``neuralop``): a 1-D FNO trained briefly on the PDEBench-layout sample
  (``sample_data/pdebench_advection.h5``, u(0, ·) ↦ u(1, ·), channels added by the selection
  ``/tensor[:, 0, None]``), saved with ``torch.save(model.state_dict(), path)``. Its state dict
  holds a ``_metadata`` entry (the constructor kwargs: ``torch._C._nn.gelu``, the class
  ``neuralop.layers.spectral_convolution.SpectralConv``, …) that plain ``weights_only=True``
  refuses; ``lsr`` loads it with no opt-in because the factory is ``neuralop.models:FNO``.
  The FNO's spectral weights are complex.
- **DeepXDE** (PyTorch backend): an ``FNN`` fitted briefly to ``sin(2πx)``, saved with
  ``torch.save(net.state_dict(), path)``, refined with ``model.factory: deepxde.nn.pytorch:FNN``.

A library that is not installed is skipped with a line saying so. Each case runs the real
``lsr`` command in a subprocess and prints the relative L2 errors before and after. Not a test.

    OMP_NUM_THREADS=1 python benchmarks/real_library_checkpoints.py [--cases neuralop deepxde]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _lsr_refine(checkpoint: Path, config: dict, work: Path, env: dict[str, str] | None = None) -> dict:
    cfg = work / "config.yaml"
    cfg.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = work / (checkpoint.stem + ".refined.pt")
    cmd = [sys.executable, "-m", "lsr_cli", "refine", str(checkpoint), "--config", str(cfg), "--out", str(out), "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"lsr refine failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(out.with_name(out.stem + ".report.json").read_text())


def _summary(name: str, report: dict) -> None:
    parts = [
        f"{split} {report['splits'][split]['before']['rel_l2']:.2e} -> {report['splits'][split]['after']['rel_l2']:.2e}"
        for split in ("train", "val", "test")
        if split in report["splits"]
    ]
    warnings = report["input"].get("warnings", [])
    print(f"{name}: input {report['input']['format']}, rank {report['rank']}; " + ", ".join(parts))
    for w in warnings:
        print(f"  note: {w}")


def run_neuralop(work: Path) -> None:
    from neuralop.models import FNO

    data = ROOT / "sample_data" / "pdebench_advection.h5"
    with h5py.File(data, "r") as f:
        u = np.asarray(f["tensor"])
    from lsr_cli.data import split_rows

    split = {"train": 0.8, "val": 0.1, "test": 0.1, "seed": 0}
    rows = split_rows(u.shape[0], split, str(data))["train"][0]
    x = torch.tensor(u[rows, 0, None])
    y = torch.tensor(u[rows, -1, None])
    kwargs = {"n_modes": [16], "in_channels": 1, "out_channels": 1, "hidden_channels": 16, "n_layers": 2}
    torch.manual_seed(0)
    model = FNO(**{**kwargs, "n_modes": tuple(kwargs["n_modes"])})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        opt.step()
    checkpoint = work / "fno_state_dict.pt"
    torch.save(model.state_dict(), checkpoint)  # what a neuraloperator user does
    try:
        torch.load(checkpoint, weights_only=True)
        print("neuralop: note: this version's state dict loads with plain weights_only=True")
    except Exception as exc:  # the case lsr handles with its allow-list
        print(f"neuralop: plain torch.load(weights_only=True) refuses it: {str(exc).splitlines()[0][:120]}")
    config = {
        "model": {"factory": "neuralop.models:FNO", "kwargs": kwargs},
        "data": {
            "path": str(data),
            "inputs": "/tensor[:, 0, None]",
            "targets": "/tensor[:, -1, None]",
            "split": split,
        },
        "lsr": {"rank": [100, 200, 400]},
        "device": "cpu",
    }
    _summary("neuralop FNO", _lsr_refine(checkpoint, config, work))


def run_deepxde(work: Path) -> None:
    os.environ.setdefault("DDE_BACKEND", "pytorch")
    import deepxde as dde

    if dde.backend.backend_name != "pytorch":
        print(f"deepxde: skipped (backend {dde.backend.backend_name}; set DDE_BACKEND=pytorch)")
        return
    rng = np.random.default_rng(0)
    path = work / "sine.h5"
    with h5py.File(path, "w") as f:
        for split, n in (("train", 256), ("val", 64), ("test", 64)):
            xs = rng.uniform(0, 1, (n, 1))
            f[f"{split}/inputs"] = xs
            f[f"{split}/targets"] = np.sin(2 * np.pi * xs)
    kwargs = {"layer_sizes": [1, 32, 32, 1], "activation": "tanh", "kernel_initializer": "Glorot normal"}
    torch.manual_seed(0)
    net = dde.nn.FNN(**kwargs)
    with h5py.File(path, "r") as f:
        x = torch.tensor(f["train/inputs"][()], dtype=torch.float32)
        y = torch.tensor(f["train/targets"][()], dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(500):
        opt.zero_grad()
        loss = torch.mean((net(x) - y) ** 2)
        loss.backward()
        opt.step()
    checkpoint = work / "fnn_state_dict.pt"
    torch.save(net.state_dict(), checkpoint)
    config = {
        "model": {"factory": "deepxde.nn.pytorch:FNN", "kwargs": kwargs},
        "data": {"path": str(path)},
        "lsr": {"rank": [50, 100, 200]},
        "device": "cpu",
    }
    _summary("deepxde FNN", _lsr_refine(checkpoint, config, work, {"DDE_BACKEND": "pytorch"}))


CASES = {"neuralop": ("neuralop", run_neuralop), "deepxde": ("deepxde", run_deepxde)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.cases:
        module, fn = CASES[name]
        if importlib.util.find_spec(module) is None:
            print(f"{name}: skipped ({module} is not installed)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            fn(Path(tmp))


if __name__ == "__main__":
    main()
