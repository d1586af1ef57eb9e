"""Does `lsr refine` help on networks and data it has never seen? Held-out test errors.

Trains small networks of several architectures with Adam (float32, full batch, as users do) on
several target functions, saves each as TorchScript or state dict, runs one-shot LSR with the
default configuration (``rank: auto``, selection on the validation split) and prints the test
relative L2 error before and after, the ratio, the chosen rank and the wall time.

    python benchmarks/generalization.py [--steps 3000] [--threads 2] [--json PATH]

Not a test: it takes a few minutes on 2 cores. Every random draw is seeded.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor, nn

import lsr_cli
from lsr_cli.config import ModelConfig
from lsr_cli.models import MLP


class ResMLP(nn.Module):
    """Residual MLP with SiLU: x → W_in → [h + W2 σ(W1 h)] × depth → W_out."""

    def __init__(self, in_features: int = 3, out_features: int = 1, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width)) for _ in range(depth)]
        )
        self.out = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class FourierFeatures(nn.Module):
    """Fixed random Fourier features (a buffer, not refined) followed by a tanh MLP."""

    def __init__(self, in_features: int = 2, num_features: int = 16, width: int = 32, scale: float = 2.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.register_buffer("freq", scale * torch.randn(in_features, num_features, generator=gen))
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_features, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        z = x @ self.freq
        return self.mlp(torch.cat([torch.sin(z), torch.cos(z)], dim=-1))


def franke(x: np.ndarray) -> np.ndarray:
    a, b = 9 * x[:, :1], 9 * x[:, 1:2]
    return (
        0.75 * np.exp(-((a - 2) ** 2 + (b - 2) ** 2) / 4)
        + 0.75 * np.exp(-((a + 1) ** 2) / 49 - (b + 1) / 10)
        + 0.5 * np.exp(-((a - 7) ** 2 + (b - 3) ** 2) / 4)
        - 0.2 * np.exp(-((a - 4) ** 2) - (b - 7) ** 2)
    )


@dataclass
class Case:
    name: str
    in_dim: int
    low: float
    target: Callable[[np.ndarray], np.ndarray]
    build: Callable[[], nn.Module]
    fmt: str  # "torchscript" | "state_dict"
    factory: ModelConfig | None = None


CASES = [
    Case("tanh MLP 32x3, Franke, TorchScript", 2, 0.0, franke, lambda: MLP(2, 1, [32, 32, 32], "tanh"), "torchscript"),
    Case(
        "GELU MLP 48x2, bump+sine, state dict",
        2,
        -1.0,
        lambda x: np.exp(-4 * (x**2).sum(1, keepdims=True)) + 0.3 * np.sin(3 * x[:, :1] + x[:, 1:2]),
        lambda: MLP(2, 1, [48, 48], "gelu"),
        "state_dict",
        ModelConfig("mlp", {"activation": "gelu"}),
    ),
    Case(
        "ResMLP SiLU, 3-D input, state dict",
        3,
        -1.0,
        lambda x: np.sin(np.pi * x[:, :1]) * x[:, 1:2] + np.cos(2 * x[:, 2:3]),
        ResMLP,
        "state_dict",
        ModelConfig(f"{Path(__file__).resolve()}:ResMLP", {}),
    ),
    Case(
        "softplus MLP 32x2, 2 outputs, TorchScript",
        2,
        -1.0,
        lambda x: np.concatenate([np.sin(2 * x[:, :1]) * x[:, 1:2], np.cos(x[:, :1] + 2 * x[:, 1:2])], axis=1),
        lambda: MLP(2, 2, [32, 32], "softplus"),
        "torchscript",
    ),
    Case(
        "Fourier features + tanh MLP, TorchScript",
        2,
        -1.0,
        lambda x: np.sin(np.pi * x[:, :1]) * np.sin(np.pi * x[:, 1:2]) + 0.3 * np.cos(4 * np.pi * x[:, :1] * x[:, 1:2]),
        FourierFeatures,
        "torchscript",
    ),
    Case(
        "ReLU MLP 64x2, smooth target, state dict",
        2,
        -1.0,
        lambda x: np.tanh(2 * x[:, :1] - x[:, 1:2]) + 0.5 * x[:, 1:2] ** 2,
        lambda: MLP(2, 1, [64, 64], "relu"),
        "state_dict",
        ModelConfig("mlp", {"activation": "relu"}),
    ),
    Case(
        "tanh MLP 64x4, sin·sin + 0.3 cos(4πxy) (tail of the spectrum)",
        2,
        -1.0,
        lambda x: np.sin(np.pi * x[:, :1]) * np.sin(np.pi * x[:, 1:2]) + 0.3 * np.cos(4 * np.pi * x[:, :1] * x[:, 1:2]),
        lambda: MLP(2, 1, [64, 64, 64, 64], "tanh"),
        "torchscript",
    ),
]


def make_data(case: Case, path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        for split, n in (("train", 2000), ("val", 500), ("test", 1000)):
            x = rng.uniform(case.low, 1.0, size=(n, case.in_dim))
            g = f.create_group(split)
            g.create_dataset("inputs", data=x)
            g.create_dataset("targets", data=case.target(x))


def train(model: nn.Module, path: Path, steps: int) -> nn.Module:
    with h5py.File(path) as f:
        x = torch.tensor(f["train/inputs"][()], dtype=torch.float32)
        y = torch.tensor(f["train/targets"][()], dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def run_case(case: Case, workdir: Path, steps: int, seed: int) -> dict:
    data = workdir / "data.h5"
    make_data(case, data, seed)
    torch.manual_seed(seed)
    model = train(case.build(), data, steps)
    ckpt_path = workdir / "model.pt"
    if case.fmt == "torchscript":
        torch.jit.script(model).save(str(ckpt_path))
    else:
        torch.save(model.state_dict(), ckpt_path)
    cfg = lsr_cli.Config()
    cfg.device = "cpu"
    t0 = time.perf_counter()
    ckpt = lsr_cli.load_checkpoint(ckpt_path, case.factory)
    splits = lsr_cli.read_data(data, cfg.data, torch.float64)
    result = lsr_cli.refine(ckpt, splits, cfg)
    seconds = time.perf_counter() - t0
    test = result.errors["test"]
    return {
        "case": case.name,
        "num_parameters": result.num_parameters,
        "before": test["before"]["rel_l2"],
        "after": test["after"]["rel_l2"],
        "ratio": test["before"]["rel_l2"] / test["after"]["rel_l2"],
        "rank": result.rank,
        "seconds": seconds,
        "stop": result.stop_reason,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="Adam steps per network")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run_case(case, Path(tmp), args.steps, args.seed))
        r = rows[-1]
        print(
            f"{r['case']}: {r['before']:.3e} -> {r['after']:.3e} ({r['ratio']:.3g}x, rank {r['rank']}, {r['seconds']:.1f}s)",
            flush=True,
        )
    print(
        f"\ntorch {torch.__version__}, {args.threads} threads, Adam {args.steps} steps (float32), refine in float64\n"
    )
    print("| case | m | test rel L2 before | after | ratio | rank | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['num_parameters']} | {r['before']:.3e} | {r['after']:.3e} | {r['ratio']:.3g}× | "
            f"{r['rank']} | {r['seconds']:.1f} |"
        )
    worst = min(r["ratio"] for r in rows)
    print(f"\nsmallest improvement: {worst:.3g}× ({'never worse' if worst >= 1 else 'WORSE on some case'})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if not all(math.isfinite(r["after"]) for r in rows):
        raise SystemExit("non-finite result")


if __name__ == "__main__":
    main()
