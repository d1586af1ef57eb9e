#!/usr/bin/env bash
# Render an HTML report of `lsr report` / `--plots` in headless Chromium and save a screenshot,
# to check that the page and its plots render (Debian: apt-get install chromium).
#   bash benchmarks/report_screenshot.sh REPORT.html OUT.png [HEIGHT]
set -euo pipefail
html=$(realpath "$1")
out=$(realpath -m "$2")
height=${3:-4200}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size=1200,"$height" \
  --screenshot="$out" "file://$html" 2>/dev/null
echo "wrote $out"
