"""The shipped samples at their shipped configs on 1 and N processes: same path, same refinement.

For each sample config (``configs/*.yaml``; ``antiderivative`` is a per-instance run, which is
single-process only) runs ``lsr refine`` on one process and with ``--nproc N`` (torchrun, Gloo
on CPU), then compares

- the path fields of the two reports (``jacobian.path``, ``jacobian.basis``, the rounds'
  ``path``, ``selection_metric``, the chosen ``rank``, ``nonlinear.ran``);
- the refined predictors at the sample's evaluation points (the ``test`` split, or
  ``/reference/inputs`` of a PDE sample): ``‖p_N − p_1‖ / ‖p_1‖``;
- the wall time and the largest per-rank peak memory of each run.

    OMP_NUM_THREADS=1 python benchmarks/distributed_samples.py                 # ~15 min on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/distributed_samples.py --samples regression poisson2d
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
import torch

from lsr_cli import load_config, load_refined, read_data
from lsr_cli.refine import predict

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ["regression", "poisson2d", "burgers", "burgers_operator", "darcy_fno"]
PATH_FIELDS = ("jacobian.path", "jacobian.basis", "selection_metric", "rank", "nonlinear.ran")


def _field(rep: dict, dotted: str) -> object:
    for key in dotted.split("."):
        rep = rep.get(key) if isinstance(rep, dict) else None  # type: ignore[assignment]
    return rep


def _run(config: Path, out: Path, nproc: int) -> tuple[dict, float]:
    ckpt = ROOT / "sample_data" / f"{config.stem}_torchscript.pt"
    cmd = [sys.executable, "-m", "lsr_cli", "refine", str(ckpt), "--config", str(config), "--out", str(out), "-q"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{config.name} on {nproc} process(es) failed:\n{proc.stderr[-2000:]}")
    return json.loads(out.with_name(out.stem + ".report.json").read_text()), wall


def _predictions(config: Path, refined: Path) -> torch.Tensor:
    cfg = load_config(config)
    model = load_refined(refined).double()
    data_path = (config.parent / cfg.data.path).resolve() if cfg.data.path else None
    assert data_path is not None
    if cfg.pde is not None:
        with h5py.File(data_path, "r") as f:
            x = torch.tensor(f["reference/inputs"][()], dtype=torch.float64)
        with torch.no_grad():
            return model(x).reshape(-1)
    splits = read_data(data_path, cfg.data, torch.float64)
    s = splits["test"] if "test" in splits else splits["val"]
    return predict(model, s.inputs, 256, shared=s.shared).reshape(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", nargs="+", default=SAMPLES, choices=SAMPLES)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lsr-dist-samples-") as tmp:
        for name in args.samples:
            config = ROOT / "configs" / f"{name}.yaml"
            runs = {}
            for nproc in (1, args.nproc):
                out = Path(tmp) / f"{name}.n{nproc}.pt"
                rep, wall = _run(config, out, nproc)
                runs[nproc] = (rep, wall, _predictions(config, out))
            (rep1, wall1, p1), (repn, walln, pn) = runs[1], runs[args.nproc]
            same = {f: _field(rep1, f) == _field(repn, f) for f in PATH_FIELDS}
            same["rounds.path"] = [r.get("path") for r in rep1["rounds"]] == [r.get("path") for r in repn["rounds"]]
            peak_n = repn["distributed"]["max_peak_memory_above_start_bytes"]
            row = {
                "sample": name,
                "nproc": args.nproc,
                "paths_equal": all(same.values()),
                "differing_fields": [f for f, ok in same.items() if not ok],
                "path": f"{rep1['jacobian']['path']}/{(rep1['rounds'][0].get('path') or 'adaptive')}",
                "rank": rep1["rank"],
                "prediction_rel_diff": float((pn - p1).norm() / p1.norm()),
                "wall_s": {"1": wall1, str(args.nproc): walln},
                "peak_mb": {
                    "1": rep1["memory"]["peak_above_start_bytes"] / 1e6 if rep1.get("memory") else None,
                    str(args.nproc): peak_n / 1e6,
                },
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'sample':<18} {'path':<22} {'rank':>5} {'paths equal':>11} {'rel diff':>10} {'wall 1/N s':>14}")
    for r in rows:
        walls = f"{r['wall_s']['1']:.0f}/{r['wall_s'][str(args.nproc)]:.0f}"
        print(
            f"{r['sample']:<18} {r['path']:<22} {r['rank']:>5} {str(r['paths_equal']):>11} "
            f"{r['prediction_rel_diff']:>10.2e} {walls:>14}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
