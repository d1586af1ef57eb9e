"""Distributed benchmark: per-rank peak memory and wall time of ``lsr refine`` on 1, 2, … processes.

Writes a synthetic regression problem (``--samples`` training rows, a tanh MLP 2-w-w-1 briefly
trained with Adam), then refines it with ``torchrun --standalone --nproc-per-node N`` for each
``N`` of ``--nprocs`` (Gloo on CPU; each run a fresh job). The sketch covers every training row
(``lsr.sketch_rows`` above the row count) and the Jacobian stays matrix-free, so the
row-dependent memory is the sketch ``Q`` (``n_local × k``) plus row chunks: per rank it should
fall about as ``1/N``, while ``Ω``, ``B = JᵀQ`` (``m × k``) and the triangles are replicated.
Prints each rank's peak memory above its start (``MemoryMeter``) and wall time from the
reports' ``distributed`` field, and the largest difference of ``δ`` against ``N = 1``.

``--path spectral``: the default path of a small supervised problem instead — ``J`` held dense
(each rank its rows), sketched to exhaustion and every rank scored on the val split
(:mod:`lsr_cli.spectral`); the row-dependent memory is then ``J`` and ``Q`` (``n_local × (m + k)``).

    OMP_NUM_THREADS=1 python benchmarks/distributed.py                       # ~2-3 min on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/distributed.py --samples 20000 --rank 100   # quick
    OMP_NUM_THREADS=1 python benchmarks/distributed.py --path spectral --samples 40000 --nprocs 1 2 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from lsr_cli.distributed import launch_command
from lsr_cli.models import MLP


def make_problem(root: Path, samples: int, width: int, seed: int, path: str = "matrix_free") -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(seed)

    def target(x: np.ndarray) -> np.ndarray:
        return np.sin(np.pi * x[:, :1]) * np.cos(np.pi * x[:, 1:2]) + 0.2 * x[:, :1] ** 2

    data = root / "data.h5"
    with h5py.File(data, "w") as f:
        for split, n in (("train", samples), ("val", max(500, samples // 20))):
            x = rng.uniform(-1, 1, size=(n, 2))
            g = f.create_group(split)
            g.create_dataset("inputs", data=x)
            g.create_dataset("targets", data=target(x))
    torch.manual_seed(seed)
    model = MLP(2, 1, hidden=[width, width])
    x = torch.tensor(rng.uniform(-1, 1, size=(2000, 2)), dtype=torch.float32)
    y = torch.tensor(target(x.numpy().astype(np.float64)), dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        opt.step()
    ckpt = root / "model.pt"
    torch.save(model.eval().state_dict(), ckpt)
    cfg = root / "cfg.yaml"
    lsr = "  jacobian: matrix_free\n" if path == "matrix_free" else "  jacobian: dense\n  max_memory: 8GB\n"
    cfg.write_text(
        f"model:\n  factory: mlp\n  kwargs: {{hidden: [{width}, {width}]}}\n"
        f"lsr:\n{lsr}  sketch_rows: {samples * 10}\ndevice: cpu\n",
        encoding="utf-8",
    )
    return data, ckpt, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=60000)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--rank", type=int, default=200)
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--path", choices=["matrix_free", "spectral"], default="matrix_free")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="lsr-dist-bench-") as tmp:
        root = Path(tmp)
        data, ckpt, cfg = make_problem(root, args.samples, args.width, args.seed, args.path)
        m = 2 * args.width + args.width + args.width * args.width + args.width + args.width + 1
        k = args.rank + 10
        print(f"n = {args.samples} training rows, m = {m} parameters, rank {args.rank} (k = {k} sketch columns)")
        print(
            f"row-dependent sketch Q on one process: {args.samples * k * 8 / 1e6:.0f} MB; B = JᵀQ: {m * k * 8 / 1e6:.1f} MB"
        )
        deltas = {}
        for nproc in args.nprocs:
            out = root / f"n{nproc}.pt"
            argv = [
                "refine",
                str(ckpt),
                "-c",
                str(cfg),
                "-d",
                str(data),
                "--rank",
                str(args.rank),
                "--out",
                str(out),
                "-q",
            ]
            t0 = time.perf_counter()
            proc = subprocess.run(launch_command(nproc, argv), capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(f"N = {nproc} failed:\n{proc.stderr[-2000:]}")
            rep = json.loads(out.with_name(out.stem + ".report.json").read_text())
            print(
                f"N = {nproc}: jacobian {rep['jacobian']['path']}, rounds {[r.get('path') for r in rep['rounds']]}, "
                f"rank {rep['rank']}, {wall:.1f} s",
                flush=True,
            )
            deltas[nproc] = torch.load(out, weights_only=False)["delta"]
            for r in rep["distributed"]["ranks"]:
                rows.append(
                    {
                        "nproc": nproc,
                        "rank": r["rank"],
                        "rows": r["rows"],
                        "peak_mb": r["peak_memory_above_start_bytes"] / 1e6,
                        "wall_s": r["wall_seconds"],
                        "job_wall_s": wall,
                        "after_val_rel_l2": rep["splits"]["val"]["after"]["rel_l2"],
                    }
                )
        print(f"{'N':>2} {'rank':>4} {'rows':>7} {'peak MB':>9} {'wall s':>7} {'job s':>6} {'val rel L2 after':>17}")
        for r in rows:
            print(
                f"{r['nproc']:>2} {r['rank']:>4} {r['rows']:>7} {r['peak_mb']:>9.1f} {r['wall_s']:>7.1f} "
                f"{r['job_wall_s']:>6.1f} {r['after_val_rel_l2']:>17.3e}"
            )
        first = args.nprocs[0]
        for nproc in args.nprocs[1:]:
            diff = max(float((deltas[nproc][key] - deltas[first][key]).abs().max()) for key in deltas[first])
            peak_1 = max(r["peak_mb"] for r in rows if r["nproc"] == first)
            peak_n = max(r["peak_mb"] for r in rows if r["nproc"] == nproc)
            print(
                f"N = {nproc}: max |δ − δ(N={first})| = {diff:.2e}; max per-rank peak {peak_n:.0f} MB vs {peak_1:.0f} MB"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
