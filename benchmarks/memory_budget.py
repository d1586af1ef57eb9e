"""Memory-budget sweep: every run stays under ``--max-memory`` or refuses up front with its minimum.

Three cases, each refined with ``lsr refine --max-memory B`` for every budget ``B`` of
``--budgets``, ``--reps`` times each (every run a fresh process):

- ``streaming``: a synthetic regression whose training inputs (100 000 x 64 float64, 51 MB) are
  read from the HDF5 file in row chunks under small budgets (``benchmarks/streaming.py``'s data),
  MLP 64-16-1, ranks 32, 64, 128;
- ``pinn``: the shipped Poisson 2-D sample at its shipped config (``rank: auto``);
- ``operator``: the shipped DeepONet Burgers-operator sample with ranks 100, 200.

For each (case, budget) the table gives how many runs refused (exit code 2, "is below the … this
run needs"), the worst peak above start over the runs that ran (the report's
``memory.peak_above_start_bytes``: resident set on the CPU), whether any run went over the
budget, the rank and the test/reference error of the last run. A peak is compared with the
budget itself, not with the plan's share of it.

    OMP_NUM_THREADS=1 python benchmarks/memory_budget.py --reps 10          # ~40 min on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/memory_budget.py --reps 2 --cases streaming
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lsr_cli.config import parse_memory
from lsr_cli.models import MLP

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming import make_data  # noqa: E402

BUDGETS = ["32MB", "48MB", "64MB", "128MB", "256MB", "2GB"]


def case_args(name: str, tmp: Path) -> list[str]:
    if name == "streaming":
        data = tmp / "big.h5"
        if not data.exists():
            make_data(data, 100_000, 64, 0)
            torch.manual_seed(0)
            torch.save(MLP(64, 1, hidden=[16]).state_dict(), tmp / "model.pt")
            (tmp / "cfg.yaml").write_text("model: {factory: mlp, kwargs: {in_features: 64, hidden: [16]}}\n")
        return [str(tmp / "model.pt"), "--config", str(tmp / "cfg.yaml"), "--data", str(data), "--rank", "32,64,128"]
    if name == "pinn":
        return [str(ROOT / "sample_data/poisson2d_torchscript.pt"), "--config", str(ROOT / "configs/poisson2d.yaml")]
    if name == "operator":
        return [
            str(ROOT / "sample_data/burgers_operator_torchscript.pt"),
            "--config",
            str(ROOT / "configs/burgers_operator.yaml"),
            "--rank",
            "100,200",
        ]
    raise ValueError(name)


def run_once(args: list[str], budget: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [
        sys.executable,
        "-m",
        "lsr_cli",
        "refine",
        *args,
        "--max-memory",
        budget,
        "--out",
        str(out),
        "--json",
        "--force",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode == 2 and "this run needs" in proc.stderr:
        need = re.search(r"below the ([0-9.]+) MB", proc.stderr)
        return {"refused": True, "minimum_mb": float(need.group(1)) if need else None, "message": proc.stderr.strip()}
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    rep = json.loads(proc.stdout)
    splits = rep["splits"]
    judged = splits.get("test") or splits.get("reference") or splits.get("val")
    mem = rep["memory"]
    return {
        "refused": False,
        "peak_mb": mem["peak_above_start_bytes"] / 1e6,
        "stages_mb": {k: v / 1e6 for k, v in mem["peak_above_start_by_stage"].items()},
        "adapted": mem["plan"]["adapted"],
        "rank": rep["rank"],
        "error_after": judged["after"]["rel_l2"] if judged else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["streaming", "pinn", "operator"])
    ap.add_argument("--budgets", nargs="+", default=BUDGETS)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None, help="also write every run here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lsr-budget-") as tmp_name:
        tmp = Path(tmp_name)
        for case in args.cases:
            cargs = case_args(case, tmp)
            for budget in args.budgets:
                runs = [run_once(cargs, budget, tmp / "out.pt") for _ in range(args.reps)]
                ran = [r for r in runs if not r["refused"]]
                limit = int(parse_memory("--max-memory", budget)) / 1e6
                worst = max((r["peak_mb"] for r in ran), default=None)
                row = {
                    "case": case,
                    "budget": budget,
                    "budget_mb": limit,
                    "runs": len(runs),
                    "refused": len(runs) - len(ran),
                    "minimum_mb": next((r["minimum_mb"] for r in runs if r["refused"]), None),
                    "worst_peak_mb": worst,
                    "over": worst is not None and worst > limit,
                    "adapted": ran[-1]["adapted"] if ran else [],
                    "rank": ran[-1]["rank"] if ran else None,
                    "error_after": ran[-1]["error_after"] if ran else None,
                    "all": runs,
                }
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "all"}), flush=True)
    print(
        f"\n{'case':<10} {'budget':>7} {'runs':>4} {'refused':>7} {'minimum':>9} {'worst peak':>11} {'over':>5} {'rank':>5} {'error':>9}"
    )
    for r in rows:
        mini = f"{r['minimum_mb']:.1f}" if r["minimum_mb"] is not None else "-"
        worst = f"{r['worst_peak_mb']:.1f}" if r["worst_peak_mb"] is not None else "-"
        err = f"{r['error_after']:.2e}" if r["error_after"] is not None else "-"
        print(
            f"{r['case']:<10} {r['budget']:>7} {r['runs']:>4} {r['refused']:>7} {mini:>9} {worst:>11} "
            f"{'YES' if r['over'] else 'no':>5} {str(r['rank'] or '-'):>5} {err:>9}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
