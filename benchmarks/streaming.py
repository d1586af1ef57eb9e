"""Streaming benchmark: data larger than ``--max-memory`` gives the in-memory result.

Writes a synthetic regression dataset whose training inputs exceed the memory budget, refines
the same checkpoint twice with ``lsr refine`` (each in a fresh process): once with the data in
memory (no budget given) and once with ``--max-memory BUDGET``, where the inputs are read from
the HDF5 file in row chunks and the reduced problem is solved by the streaming QR. Prints both
results, the largest difference of ``δ``, and each run's peak memory above its start against
the budget.

    OMP_NUM_THREADS=1 python benchmarks/streaming.py                 # ~2-4 min on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/streaming.py --samples 100000 --budget 48MB   # quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from lsr_cli.models import MLP


def make_data(path: Path, samples: int, features: int, seed: int) -> None:
    """Targets ``tanh(x·a) + 0.3 sin(x·b)`` of ``features``-dimensional inputs, written in blocks."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=features) / np.sqrt(features)
    b = rng.normal(size=features) / np.sqrt(features)
    with h5py.File(path, "w") as f:
        for split, n in (("train", samples), ("val", max(1000, samples // 50)), ("test", max(1000, samples // 50))):
            g = f.create_group(split)
            x_ds = g.create_dataset("inputs", shape=(n, features), dtype="f8", chunks=(min(n, 4096), features))
            y_ds = g.create_dataset("targets", shape=(n, 1), dtype="f8")
            for s in range(0, n, 65536):
                e = min(n, s + 65536)
                x = rng.uniform(-1, 1, size=(e - s, features))
                x_ds[s:e] = x
                y_ds[s:e, 0] = np.tanh(x @ a * 2) + 0.3 * np.sin(3 * x @ b)


def run(args: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lsr_cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"lsr {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--budget", default="128MB")
    parser.add_argument("--ranks", default="32,64,128")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "big.h5"
        t0 = time.perf_counter()
        make_data(data, args.samples, args.features, args.seed)
        torch.manual_seed(args.seed)
        model = MLP(args.features, 1, hidden=[16])
        torch.save(model.state_dict(), root / "model.pt")
        cfg = root / "cfg.yaml"
        cfg.write_text(f"model: {{factory: mlp, kwargs: {{in_features: {args.features}, hidden: [16]}}}}\n")
        input_mb = args.samples * args.features * 8 / 1e6
        print(
            f"training inputs {input_mb:.0f} MB ({args.samples} x {args.features} float64), written in {time.perf_counter() - t0:.1f} s"
        )
        common = [
            "refine",
            str(root / "model.pt"),
            "--config",
            str(cfg),
            "--data",
            str(data),
            "--rank",
            args.ranks,
            "--json",
            "--force",
        ]
        in_mem, t_mem = run([*common, "--out", str(root / "memory.pt")])
        streamed, t_str = run([*common, "--out", str(root / "streamed.pt"), "--max-memory", args.budget])
        d_mem = torch.load(root / "memory.pt", weights_only=True)["delta"]
        d_str = torch.load(root / "streamed.pt", weights_only=True)["delta"]
        diff = max(float((d_mem[k] - d_str[k]).abs().max() / d_mem[k].abs().max().clamp_min(1e-300)) for k in d_mem)

    budget = streamed["memory"]["budget_bytes"]
    print(
        f"{'run':<10} {'streamed':<9} {'rank':>5} {'test before':>12} {'test after':>12} {'peak above start':>17} {'time':>7}"
    )
    for name, rep, t in (("in memory", in_mem, t_mem), ("streamed", streamed, t_str)):
        test = rep["splits"]["test"]
        print(
            f"{name:<10} {','.join(rep['memory']['streamed_splits']) or '-':<9} {rep['rank']:>5} "
            f"{test['before']['rel_l2']:>12.4e} {test['after']['rel_l2']:>12.4e} "
            f"{rep['memory']['peak_above_start_bytes'] / 1e6:>14.1f} MB {t:>6.1f}s"
        )
    print("peak above start by stage (MB):")
    for name, rep in (("in memory", in_mem), ("streamed", streamed)):
        stages = rep["memory"]["peak_above_start_by_stage"]
        print(f"  {name:<10} " + "  ".join(f"{k} {v / 1e6:.1f}" for k, v in stages.items()))
    peak = streamed["memory"]["peak_above_start_bytes"]
    print(
        f"budget {budget / 1e6:.1f} MB; streamed peak {peak / 1e6:.1f} MB ({'under' if peak < budget else 'OVER'} the budget)"
    )
    print(f"max relative difference of delta, streamed vs in memory: {diff:.2e}")
    rel = abs(streamed["splits"]["test"]["after"]["rel_l2"] / in_mem["splits"]["test"]["after"]["rel_l2"] - 1)
    print(f"relative difference of the refined test error: {rel:.2e}")


if __name__ == "__main__":
    main()
