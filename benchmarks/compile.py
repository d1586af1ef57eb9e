"""``lsr refine`` with and without ``--compile`` (torch.compile of the matrix-free JVPs), same
checkpoint, data and row chunk, one after the other in one run: total and per-stage seconds,
the first compiled call (mostly compiling) and the test error (must agree to round-off).

Cases: the shipped regression MLP (state dict, ``lsr.jacobian: matrix_free``, row chunk 512)
and the shipped DeepONet Burgers operator (state dict, matrix-free as ``auto`` chooses).
Not a test.

    OMP_NUM_THREADS=1 python benchmarks/compile.py [--cases regression deeponet]   # ~8 min
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "regression": (
        "sample_data/regression_state_dict.pt",
        "configs/regression.yaml",
        {"jacobian": "matrix_free", "row_chunk": 512},
    ),
    "deeponet": ("sample_data/burgers_operator_state_dict.pt", "configs/burgers_operator.yaml", {"row_chunk": 128}),
}


def run(case: str, compile_: bool, tmp: Path) -> dict:
    ckpt, config, lsr = CASES[case]
    cfg = yaml.safe_load((ROOT / config).read_text())
    cfg["lsr"].update(lsr)
    data = cfg["data"]["path"]
    cfg["data"]["path"] = str((ROOT / config).parent / data)
    cfg["model"].pop("checkpoint", None)
    path = tmp / f"{case}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    tag = "compiled" if compile_ else "eager"
    out, rep = tmp / f"{case}_{tag}.pt", tmp / f"{case}_{tag}.json"
    cmd = ["lsr", "refine", str(ROOT / ckpt), "--config", str(path), "--out", str(out), "--report", str(rep), "--quiet"]
    subprocess.run(cmd + (["--compile"] if compile_ else []), check=True)
    return json.loads(rep.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            rows = {tag: run(case, tag == "compiled", Path(tmp)) for tag in ("eager", "compiled")}
            for tag, r in rows.items():
                t = r["timings"]
                stages = ", ".join(f"{k} {t[k]:.1f}" for k in ("sketch", "project", "solve") if k in t)
                first = r.get("compile", {}).get("first_call_seconds")
                extra = f", first compiled call {first:.1f} s" if first else ""
                print(
                    f"{case:10s} {tag:8s} total {t['total']:6.1f} s ({stages}{extra}); "
                    f"test rel L2 {r['splits']['test']['after']['rel_l2']:.6e}, rank {r['rank']}",
                    flush=True,
                )
            ratio = rows["eager"]["timings"]["total"] / rows["compiled"]["timings"]["total"]
            print(f"{case:10s} eager / compiled total time: {ratio:.2f}x", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
