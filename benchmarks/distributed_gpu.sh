#!/usr/bin/env bash
# NCCL/GPU check of distributed `lsr refine` (a few minutes on a machine with >= 1 CUDA GPU).
#
#   bash benchmarks/distributed_gpu.sh            # from the repository root, lsr_cli installed
#
# 1. the single-process refinement on cuda:0 (reference);
# 2. the same through torchrun with 1 process (NCCL, world size 1): must equal it bit for bit;
# 3. with N = number of GPUs (if >= 2): NCCL over N GPUs: δ within 1e-10 of the reference;
# 4. a failure injected on the last rank: non-zero exit, one error line, no output.
# Prints per-rank peak GPU memory and wall time from the reports' `distributed` field.
set -euo pipefail
export OMP_NUM_THREADS=1
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then echo "no CUDA device: nothing to check"; exit 1; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

python - "$WORK" <<'EOF'
import sys, pathlib, numpy as np, torch, h5py
from lsr_cli.models import MLP
root = pathlib.Path(sys.argv[1])
rng = np.random.default_rng(0)
f = lambda x: np.sin(np.pi * x[:, :1]) * np.cos(np.pi * x[:, 1:2])
with h5py.File(root / "data.h5", "w") as h:
    for split, n in (("train", 40001), ("val", 2001), ("test", 2001)):
        x = rng.uniform(-1, 1, size=(n, 2)); g = h.create_group(split)
        g.create_dataset("inputs", data=x); g.create_dataset("targets", data=f(x))
torch.manual_seed(0)
model = MLP(2, 1, hidden=[64, 64])
x = torch.tensor(rng.uniform(-1, 1, size=(4000, 2)), dtype=torch.float32); y = torch.tensor(f(x.numpy()))
opt = torch.optim.Adam(model.parameters(), lr=5e-3)
for _ in range(300):
    opt.zero_grad(); loss = torch.mean((model(x) - y.float()) ** 2); loss.backward(); opt.step()
torch.save(model.state_dict(), root / "model.pt")
(root / "cfg.yaml").write_text("model:\n  factory: mlp\n  kwargs: {hidden: [64, 64]}\nlsr:\n  rank: [100, 200, 400]\n  sketch_rows: 1000000\n")
EOF

ARGS=(refine "$WORK/model.pt" -c "$WORK/cfg.yaml" -d "$WORK/data.h5" --device cuda -q)
python -m lsr_cli "${ARGS[@]}" --out "$WORK/single.pt"
python -m torch.distributed.run --standalone --nproc-per-node 1 -m lsr_cli "${ARGS[@]}" --out "$WORK/n1.pt"
RUNS=(n1)
if [ "$NGPU" -ge 2 ]; then
  python -m lsr_cli "${ARGS[@]}" --out "$WORK/n$NGPU.pt" --nproc "$NGPU"
  RUNS+=("n$NGPU")
fi

python - "$WORK" "${RUNS[@]}" <<'EOF'
import sys, json, pathlib, torch
root = pathlib.Path(sys.argv[1])
ref = torch.load(root / "single.pt", weights_only=False)["delta"]
ok = True
for name in sys.argv[2:]:
    d = torch.load(root / f"{name}.pt", weights_only=False)["delta"]
    diff = max(float((d[k] - ref[k]).abs().max()) for k in ref)
    rep = json.loads((root / f"{name}.report.json").read_text())
    dist = rep["distributed"]
    want = 1e-12 if dist["world_size"] == 1 else 1e-10  # world 1 runs the single-process arithmetic
    good = diff <= want and dist["backend"] == "nccl"
    ok &= good
    print(f"{name}: world {dist['world_size']} backend {dist['backend']} max|δ-δ_single| = {diff:.2e} "
          f"({'ok' if good else 'FAIL'}), val rel L2 after {rep['splits']['val']['after']['rel_l2']:.3e}")
    for r in dist["ranks"]:
        print(f"   rank {r['rank']} {r['device']}: rows {r['rows']}, peak {r['peak_memory_above_start_bytes']/1e6:.0f} MB "
              f"({r['peak_memory_kind']}), wall {r['wall_seconds']:.1f} s")
sys.exit(0 if ok else 1)
EOF

NP=$(( NGPU >= 2 ? NGPU : 1 ))
set +e
LSR_INJECT_FAILURE="$((NP - 1)):sketch" python -m lsr_cli "${ARGS[@]}" --out "$WORK/fail/x.pt" --nproc "$NP" 2> "$WORK/fail.err"
RC=$?
set -e
if [ "$NP" -eq 1 ]; then  # --nproc 1 runs in-process: the hook needs torchrun
  set +e
  LSR_INJECT_FAILURE="0:sketch" python -m torch.distributed.run --standalone --nproc-per-node 1 -m lsr_cli "${ARGS[@]}" \
    --out "$WORK/fail/x.pt" 2> "$WORK/fail.err"
  RC=$?
  set -e
fi
LINES=$(grep -c '^error:' "$WORK/fail.err" || true)
echo "injected failure: exit $RC, $LINES error line(s): $(grep '^error:' "$WORK/fail.err" | head -1)"
if [ "$RC" -eq 0 ] || [ "$LINES" -ne 1 ] || [ -e "$WORK/fail" ]; then echo "failure check FAILED"; exit 1; fi
echo "all distributed GPU checks passed"
