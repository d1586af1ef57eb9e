"""Block weights for PDE refinement: the training loss's, 100 on every non-`pde` block, `pde.weights: auto`.

For every PINN of ``benchmarks/unseen_pinns.py`` (cached under ``runs/unseen_pinns``; run that
benchmark first) and the shipped Poisson sample, ``lsr refine`` runs with its defaults and three
weightings of the same blocks:

- ``training``: the weights the network was trained with (the config as written);
- ``100``: weight 100 on every boundary / initial block (the README's old example);
- ``auto``: ``pde.weights: auto`` with no block weights (:mod:`lsr_cli.pde.weights`).

Reference relative L2 errors and times go to ``docs/benchmarks/pde_weights.{md,json}``.

    OMP_NUM_THREADS=1 python benchmarks/pde_weights.py
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
UNSEEN = ("burgers", "burgers_lbfgs", "allen_cahn", "helmholtz", "diffusion_reaction", "poisson_lshape")


def cases(work: Path) -> list[tuple[str, Path, Path]]:
    """(name, checkpoint, config) of every PINN available."""
    out = []
    for name in UNSEEN:
        folder = work / name
        if (folder / "model.pt").exists() and (folder / "lsr.yaml").exists():
            out.append((name, folder / "model.pt", folder / "lsr.yaml"))
    out.append(
        ("poisson2d (sample)", ROOT / "sample_data" / "poisson2d_torchscript.pt", ROOT / "configs" / "poisson2d.yaml")
    )
    return out


def variant(cfg_path: Path, how: str, out_dir: Path) -> Path:
    """The config with its block weights as ``how`` says, written next to ``out_dir`` with
    absolute paths (so it can live anywhere)."""
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg = copy.deepcopy(cfg)
    base = cfg_path.parent
    if "checkpoint" in cfg.get("model", {}):
        cfg["model"]["checkpoint"] = str((base / cfg["model"]["checkpoint"]).resolve())
    if "path" in cfg.get("data", {}):
        cfg["data"]["path"] = str((base / cfg["data"]["path"]).resolve())
    for blk in cfg["pde"]["blocks"]:
        if how == "100" and blk.get("kind", "pde") != "pde":
            blk["weight"] = 100
        if how == "auto":
            blk.pop("weight", None)
    if how == "auto":
        cfg["pde"]["weights"] = "auto"
    path = out_dir / f"{how}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def refine(ckpt: Path, cfg: Path, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "lsr_cli", "refine", str(ckpt), "--config", str(cfg), "--out", str(out)]
    t0 = time.perf_counter()
    p = subprocess.run([*cmd, "--force", "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"failed": p.stderr.strip()[-500:], "wall_seconds": wall}
    rep = json.loads(p.stdout)
    ref = rep["splits"]["reference"]
    return {
        "start": ref["before"]["rel_l2"],
        "error": ref["after"]["rel_l2"],
        "rank": rep["rank"],
        "seconds": rep["timings"]["total"],
        "weights": rep["residual_loss"]["weights"]["weights"],
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| PINN | start | training weights | 100 on boundary/initial | `pde.weights: auto` | auto / training | auto / 100 | auto weights |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        t, h, a = r["training"], r["100"], r["auto"]
        if any("failed" in x for x in (t, h, a)):
            lines.append(f"| {name} | failed: see the json |")
            continue
        w = ", ".join(f"{k} {v:.3g}" for k, v in a["weights"].items())
        lines.append(
            f"| {name} | {t['start']:.2e} | {t['error']:.2e} ({t['seconds']:.0f} s) | {h['error']:.2e} "
            f"({h['seconds']:.0f} s) | {a['error']:.2e} ({a['seconds']:.0f} s) | {a['error'] / t['error']:.2f} | "
            f"{a['error'] / h['error']:.2f} | {w} |"
        )
    ok = [r for r in results.values() if not any("failed" in x for x in r.values())]
    if ok:
        g = lambda key: statistics.geometric_mean([r["auto"]["error"] / r[key]["error"] for r in ok])  # noqa: E731
        worst = lambda key: max(r["auto"]["error"] / r[key]["error"] for r in ok)  # noqa: E731
        lines.append("")
        lines.append(
            f"auto / training: geometric mean {g('training'):.2f}, worst {worst('training'):.2f}; "
            f"auto / 100: geometric mean {g('100'):.2f}, worst {worst('100'):.2f} (below 1: auto better)."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "unseen_pinns")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "pde_weights")
    ap.add_argument("--only", nargs="+", default=None, help="re-run these PINNs, keep the others' cached results")
    ap.add_argument("--weights", nargs="+", default=["training", "100", "auto"], choices=["training", "100", "auto"])
    args = ap.parse_args()
    cached = args.out.with_suffix(".json")
    results: dict[str, dict[str, Any]] = json.loads(cached.read_text()) if args.only and cached.exists() else {}
    for name, ckpt, cfg in cases(args.work):
        if args.only and name.split()[0] not in args.only:
            continue
        folder = ROOT / "runs" / "pde_weights" / name.split()[0]
        folder.mkdir(parents=True, exist_ok=True)
        results.setdefault(name, {})
        for how in args.weights:
            r = refine(ckpt, variant(cfg, how, folder), folder / f"{how}.pt")
            results[name][how] = r
            print(name, how, {k: v for k, v in r.items() if k != "weights"}, flush=True)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    md = (
        "# Block weights for PDE refinement (`benchmarks/pde_weights.py`)\n\n"
        "Reference relative L2 error after `lsr refine` (defaults, validation points and adaptive "
        "collocation on), by the weights of the same blocks. Times on this 2-core CPU with other jobs "
        "running.\n\n" + table(results)
    )
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
