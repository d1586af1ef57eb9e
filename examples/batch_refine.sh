#!/usr/bin/env bash
# Refine every checkpoint (*.pt) of a folder with one config; keep going past failures and
# write one CSV summary: checkpoint, exit code, rank, the split the errors are on, the relative
# L2 error before and after, seconds.
#
#   examples/batch_refine.sh FOLDER CONFIG [OUT_DIR] [-- more lsr refine options]
#   examples/batch_refine.sh sample_data configs/regression.yaml runs/batch -- --rank 256
#
# Writes OUT_DIR (default runs/batch)/NAME.refined.pt, NAME.refined.report.json, NAME.log (what
# lsr printed on stderr) and summary.csv. The exit code column is lsr's (README, "Exit codes":
# 2 config, 3 data, 4 checkpoint, 5 numerical, 6 output exists — add `-- --force` to redo).
# The errors are those of the test split, else the PDE reference, else val, else train; a
# physics-informed run without a reference reports its weighted residual loss (split
# "residual"). This script exits with 1 when any refinement failed. Environment: LSR (the
# command, default `lsr`), PYTHON (default `python3`).
set -uo pipefail

if [ $# -lt 2 ] || [ ! -d "$1" ] || [ ! -f "$2" ]; then
    echo "usage: $0 FOLDER CONFIG [OUT_DIR] [-- more lsr refine options]" >&2
    exit 2
fi
folder=$1
config=$2
shift 2
out_dir=runs/batch
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    out_dir=$1
    shift
fi
[ $# -gt 0 ] && [ "$1" = "--" ] && shift
extra=("$@")
read -r -a lsr <<< "${LSR:-lsr}"
python=${PYTHON:-python3}

shopt -s nullglob
checkpoints=("$folder"/*.pt)
if [ ${#checkpoints[@]} -eq 0 ]; then
    echo "no *.pt checkpoints in $folder" >&2
    exit 2
fi
mkdir -p "$out_dir"
summary=$out_dir/summary.csv
echo "checkpoint,exit_code,rank,split,error_before,error_after,seconds" > "$summary"

# one CSV row from the --json report (empty cells for a failed run)
row='
import csv, json, sys

checkpoint, code, path = sys.argv[1:]
rank = split = before = after = seconds = ""
if code == "0":
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    splits = report["splits"]
    split = next((s for s in ("test", "reference", "val", "train") if s in splits), "")
    if split:
        before, after = splits[split]["before"]["rel_l2"], splits[split]["after"]["rel_l2"]
    elif "residual_loss" in report:
        split, before, after = "residual", report["residual_loss"]["before"], report["residual_loss"]["after"]
    rank, seconds = report["rank"], round(report["timings"]["total"], 2)
csv.writer(sys.stdout, lineterminator="\n").writerow([checkpoint, code, rank, split, before, after, seconds])
'

failed=0
for checkpoint in "${checkpoints[@]}"; do
    name=$(basename "$checkpoint" .pt)
    json=$out_dir/$name.json
    "${lsr[@]}" refine "$checkpoint" --config "$config" --out "$out_dir/$name.refined.pt" --json ${extra[@]+"${extra[@]}"} \
        > "$json" 2> "$out_dir/$name.log"
    code=$?
    [ $code -eq 0 ] || failed=$((failed + 1))
    "$python" -c "$row" "$checkpoint" "$code" "$json" >> "$summary"
    echo "$checkpoint: exit code $code" >&2
    rm -f "$json"  # the same report is in NAME.refined.report.json
done
echo "wrote $summary (${#checkpoints[@]} checkpoints, $failed failed)" >&2
[ $failed -eq 0 ]
