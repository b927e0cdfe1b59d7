#!/usr/bin/env bash
# The fleet's whole loop on synthetic lines, in a few minutes on 2 CPU cores (issue 10 item 7):
# boxes running v1 see a shifted line and raise a drift alarm, hard examples come back and are exported (the
# synthetic ground truth stands in for the labeller), `defectkit retrain` passes its forgetting gate, the new
# version is bundled, pushed, canaried and promoted; then a bad version is canaried and rolled back.
# It prints a timeline with the figures behind each decision (also in OUT/timeline.json).
#
#   scripts/fleet_demo.sh [--out fleet_demo_out] [--boxes 2] [--shifted 60] [--epochs 1] ...
# All the work is `defectkit fleet-demo` (defectkit/fleet_demo.py); this script only finds the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/install.sh)
echo "== fleet demo: synthetic lines; the labeller is played by the synthetic ground truth (no human review here)"
exec "$VENV/bin/python" -m defectkit fleet-demo "$@"
