#!/usr/bin/env bash
# Run the collector and one edge box on this machine, on a signed bundle: the whole loop locally.
#
#   scripts/edge_demo.sh [--bundle BUNDLE] [--public-key KEY.pub.pem] [options]
#
#   --bundle PATH      bundle directory or .tar.gz (default: the newest one `make demo` left under demo_out/)
#   --public-key PEM   the signer's public key (default: the .pub.pem beside the demo's keys)
#   --images DIR       frames to inspect (default: the demo's held-back boards, else the bundle's golden images)
#   --work DIR         collector db, tokens, edge outputs and state (default: a new folder under /tmp)
#   --watch SECONDS    watch the images folder for SECONDS (drop files in meanwhile), then stop with SIGTERM
#   --stop-file FILE   with --watch: stop as soon as FILE exists (SECONDS is then the longest watch)
#   --box              run the edge side inside the Python 3.9 edge box (scripts/edge_box.sh; needs root)
#   --backend NAME     force the edge backend (onnxruntime, paddlelite, paddle)
#   --report-interval S  seconds between reports (default 2)
# The edge box reports every few seconds to the collector; at the end it stops cleanly (the last report is sent
# on the way out) and the collector's reports and hard examples are listed. Ctrl-C stops both sides cleanly.
set -euo pipefail
KIT=$(cd "$(dirname "$0")/.." && pwd)

usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit "${1:-0}"; }
die() { echo "edge_demo.sh: $*" >&2; exit 2; }

BUNDLE="" KEY="" IMAGES="" WORK="" WATCH=0 STOP_FILE="" BOX=0 BACKEND=() INTERVAL=2
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage 0 ;;
    --bundle) BUNDLE=${2:?--bundle needs a path}; shift ;;
    --public-key) KEY=${2:?--public-key needs a file}; shift ;;
    --images) IMAGES=${2:?--images needs a folder}; shift ;;
    --work) WORK=${2:?--work needs a folder}; shift ;;
    --watch) WATCH=${2:?--watch needs seconds}; shift ;;
    --stop-file) STOP_FILE=${2:?--stop-file needs a path}; shift ;;
    --box) BOX=1 ;;
    --backend) BACKEND=(--backend "${2:?--backend needs a name}"); shift ;;
    --report-interval) INTERVAL=${2:?--report-interval needs seconds}; shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done
[[ "$WATCH" =~ ^[0-9]+$ ]] || die "--watch takes whole seconds, got '$WATCH'"
[[ "$INTERVAL" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--report-interval takes seconds, got '$INTERVAL'"

if [ -n "${DEFECTKIT_PY:-}" ]; then PY=$DEFECTKIT_PY
elif [ -x "$KIT/.venv/bin/python" ]; then PY=$KIT/.venv/bin/python
else PY="$(bash "$KIT/scripts/install.sh")/bin/python"; fi

if [ -z "$BUNDLE" ]; then
  BUNDLE=$(ls -t "$KIT"/demo_out/bundles/*/*.tar.gz 2>/dev/null | head -n1 || true)
  [ -n "$BUNDLE" ] || die "no --bundle given and no demo bundle under demo_out/bundles/ (run 'make demo' first)"
fi
[ -e "$BUNDLE" ] || die "bundle $BUNDLE does not exist: pass a bundle directory or .tar.gz (--bundle PATH)"
if [ -z "$KEY" ]; then
  KEY=$(ls "$KIT"/demo_out/keys/*.pub.pem 2>/dev/null | head -n1 || true)
  [ -n "$KEY" ] || die "no --public-key given and none under demo_out/keys/"
fi
[ -f "$KEY" ] || die "public key $KEY does not exist"
BUNDLE=$(realpath "$BUNDLE"); KEY=$(realpath "$KEY")
WORK=${WORK:-$(mktemp -d /tmp/defectkit-edge-demo.XXXXXX)}
mkdir -p "$WORK"; WORK=$(realpath "$WORK")

if [ -z "$IMAGES" ]; then
  if [ -d "$KIT/demo_out/data/holdout/images" ]; then IMAGES=$KIT/demo_out/data/holdout/images
  else
    # the bundle's own golden images: verified and extracted by the kit, never trusted unverified
    "$PY" -m defectkit bundle verify "$BUNDLE" --public-key "$KEY" >&2
    mkdir -p "$WORK/images" "$WORK/bundle-copy"
    if [ -d "$BUNDLE" ]; then cp -r "$BUNDLE/golden" "$WORK/bundle-copy/"; else tar -xzf "$BUNDLE" -C "$WORK/bundle-copy"; fi
    find "$WORK/bundle-copy/golden" -type f ! -name '*.json' -exec cp {} "$WORK/images/" \;
    IMAGES=$WORK/images
  fi
fi
[ -d "$IMAGES" ] || die "images folder $IMAGES does not exist"
IMAGES=$(realpath "$IMAGES")

# One device token and an admin token, made for this demo only.
DEVICE=demo-box-01
TOKEN=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')
ADMIN=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')
printf '{"admin": "%s", "devices": {"%s": "%s"}}\n' "$ADMIN" "$DEVICE" "$TOKEN" > "$WORK/tokens.json"
printf '%s\n' "$TOKEN" > "$WORK/device.token"
chmod 600 "$WORK/tokens.json" "$WORK/device.token"

COLLECTOR_PID="" EDGE_PID=""
cleanup() {
  if [ -n "$EDGE_PID" ] && kill -0 -- "-$EDGE_PID" 2>/dev/null; then  # interrupted while watching: stop it cleanly
    kill -TERM -- "-$EDGE_PID" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 -- "-$EDGE_PID" 2>/dev/null || break; sleep 0.2; done
  fi
  if [ -n "$COLLECTOR_PID" ]; then kill "$COLLECTOR_PID" 2>/dev/null || true; wait "$COLLECTOR_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cd "$KIT"
"$PY" -m fleet.collector serve --db "$WORK/collector.db" --port 0 --tokens "$WORK/tokens.json" \
  > "$WORK/collector.log" 2>&1 &
COLLECTOR_PID=$!
URL=""
for _ in $(seq 100); do
  URL=$(sed -n 's/^collector listening on \(http[^ ]*\).*/\1/p' "$WORK/collector.log" | head -n1)
  [ -n "$URL" ] && break
  kill -0 "$COLLECTOR_PID" 2>/dev/null || { cat "$WORK/collector.log" >&2; die "the collector did not start"; }
  sleep 0.1
done
[ -n "$URL" ] || die "the collector did not announce its URL (log: $WORK/collector.log)"
echo "edge_demo: collector on $URL (db $WORK/collector.db)" >&2

RUN=(python -m edge_runtime run --bundle "$BUNDLE" --public-key "$KEY" --source "$IMAGES" --device-id "$DEVICE"
     --collector "$URL" --token-file "$WORK/device.token" --out "$WORK/edge" --report-interval "$INTERVAL"
     --metrics-port 0 --exit-flush-seconds 60 "${BACKEND[@]}")  # the demo shows every report arrive: wait for them
[ "$WATCH" != 0 ] && RUN+=(--watch)
if [ "$BOX" = 1 ]; then
  mkdir -p "$WORK/edge"
  BIND=(--bind "$WORK" --bind "$IMAGES" --bind "$(dirname "$BUNDLE")" --bind "$(dirname "$KEY")")
  CMD=(bash "$KIT/scripts/edge_box.sh" run "${BIND[@]}" -- "${RUN[@]}")
else
  CMD=("$PY" "${RUN[@]:1}")
fi
echo "edge_demo: ${CMD[*]}" >&2
if [ "$WATCH" != 0 ]; then
  # its own process group, so SIGTERM reaches the runtime itself also through the edge box's wrappers
  setsid "${CMD[@]}" &
  EDGE_PID=$!
  echo "edge_demo: watching $IMAGES for $WATCH s (drop images in)${STOP_FILE:+ or until $STOP_FILE exists}; then SIGTERM" >&2
  end=$((SECONDS + WATCH))
  while [ "$SECONDS" -lt "$end" ] && { [ -z "$STOP_FILE" ] || [ ! -e "$STOP_FILE" ]; }; do sleep 0.2; done
  kill -TERM -- "-$EDGE_PID" 2>/dev/null || true
  wait "$EDGE_PID" || true
  while kill -0 -- "-$EDGE_PID" 2>/dev/null; do sleep 0.2; done  # the runtime flushes after the wrappers end
else
  "${CMD[@]}" || { rc=$?; echo "edge_demo: the edge runtime failed (exit $rc); collector log: $WORK/collector.log" >&2; exit "$rc"; }
fi
# the runtime sent the last report on the way out (a 2xx means the collector committed it)

echo "edge_demo: what the collector received" >&2
"$PY" -m fleet.collector list --db "$WORK/collector.db" --what reports --limit 50
"$PY" -m fleet.collector list --db "$WORK/collector.db" --what hard-examples --limit 10
LINES=$(cat "$WORK"/edge/predictions/*.jsonl 2>/dev/null | wc -l)
echo "edge_demo: $LINES JSON lines (one per image) in $WORK/edge/predictions/" >&2
echo "edge_demo: edge outputs in $WORK/edge (predictions/, ng/, summary/), state in $WORK/edge/state" >&2
