#!/usr/bin/env bash
# Train a line in the GPU container (default) or on this host, through `defectkit train`.
#
#   scripts/train_line.sh LINE.yaml [options] [-- more `defectkit train` arguments]
#
#   --no-docker      run on this host (python: $DEFECTKIT_PY, else the venv of scripts/install.sh)
#   --gpus N         GPUs to train on; N > 1 starts one process per GPU with paddle.distributed.launch
#   --cpu-procs N    N training processes on the CPU (paddle.distributed.launch over gloo; for tests)
#   --image IMAGE    container image (default defectkit-gpu:latest, see docker/Dockerfile.gpu)
#   --build          build the image first (docker build -f docker/Dockerfile.gpu)
#   --runs DIR       runs folder, mounted read-write (default ./runs)
#   --data DIR       another host folder the line needs, mounted read-only (repeatable); the line's own
#                    paths.root is found in the YAML and mounted read-only automatically
#   --dry-run        print the commands instead of running them
# Every other argument goes to `defectkit train` (e.g. --name r1 --epochs 80, or --resume runs/<line>/r1).
# Host folders are mounted at the same absolute paths (the current folder read-only, the runs folder
# read-write) and the container starts in the current folder, so relative paths mean the same inside.
set -euo pipefail
KIT=$(cd "$(dirname "$0")/.." && pwd)
HERE=$PWD

usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit "${1:-0}"; }
die() { echo "train_line.sh: $*" >&2; exit 2; }

LINE="" DOCKER=1 GPUS=1 CPU_PROCS=0 IMAGE=defectkit-gpu:latest BUILD=0 RUNS=runs DRY=0
DATA=() PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage 0 ;;
    --no-docker) DOCKER=0 ;;
    --gpus) GPUS=${2:?--gpus needs a number}; shift ;;
    --cpu-procs) CPU_PROCS=${2:?--cpu-procs needs a number}; shift ;;
    --image) IMAGE=${2:?--image needs a name}; shift ;;
    --build) BUILD=1 ;;
    --runs) RUNS=${2:?--runs needs a folder}; shift ;;
    --data) DATA+=("${2:?--data needs a folder}"); shift ;;
    --dry-run) DRY=1 ;;
    --) shift; PASS+=("$@"); break ;;
    *) if [ -z "$LINE" ] && [[ "$1" != -* ]]; then LINE=$1; else PASS+=("$1"); fi ;;
  esac
  shift
done
[ -n "$LINE" ] || usage 2
[ -f "$LINE" ] || die "line spec '$LINE' does not exist (create one with: defectkit synth --out data/<line>)"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus takes a number of GPUs (1, 2, ...), got '$GPUS'"
[[ "$CPU_PROCS" =~ ^[0-9]+$ ]] || die "--cpu-procs takes a number, got '$CPU_PROCS'"
[ "$CPU_PROCS" -gt 0 ] && [ "$DOCKER" = 1 ] && die "--cpu-procs runs on the host: add --no-docker"

abspath() { (cd "$(dirname "$1")" && printf '%s/%s\n' "$PWD" "$(basename "$1")"); }
LINE=$(abspath "$LINE")
mkdir -p "$RUNS"
RUNS=$(cd "$RUNS" && pwd)
# the line's data root: `paths:` then an indented `root:` (relative to the YAML file)
ROOT=$(awk '/^paths:/{p=1; next} p && /^[^ ]/{p=0} p && $1=="root:"{print $2; exit}' "$LINE")
if [ -n "$ROOT" ]; then
  case "$ROOT" in /*) ;; *) ROOT="$(dirname "$LINE")/$ROOT" ;; esac
  if [ -d "$ROOT" ]; then DATA+=("$(cd "$ROOT" && pwd)")
  else echo "train_line.sh: warning: the line's data root $ROOT does not exist (yet)" >&2; fi
fi

# the command that trains, inside the container or on the host
inner_python() { if [ "$DOCKER" = 1 ]; then echo python3; else echo "${DEFECTKIT_PY:-$KIT/.venv/bin/python}"; fi; }
entry() { if [ "$DOCKER" = 1 ]; then echo /opt/defectkit/defectkit/__main__.py; else echo "$KIT/defectkit/__main__.py"; fi; }
PY=$(inner_python)
TRAIN=(train "$LINE" --runs "$RUNS" "${PASS[@]}")
if [ "$CPU_PROCS" -gt 1 ]; then
  CMD=("$PY" -m paddle.distributed.launch --nproc_per_node "$CPU_PROCS" --log_dir "$RUNS/launch-logs"
       "$(entry)" "${TRAIN[@]}" --set device=cpu)
elif [ "$GPUS" -gt 1 ]; then
  CMD=("$PY" -m paddle.distributed.launch --gpus "$(seq -s, 0 $((GPUS - 1)))" --log_dir "$RUNS/launch-logs"
       "$(entry)" "${TRAIN[@]}")
else
  CMD=("$PY" "$(entry)" "${TRAIN[@]}")
fi

if [ "$DOCKER" = 1 ]; then
  MOUNTS=(-v "$HERE:$HERE:ro" -v "$(dirname "$LINE"):$(dirname "$LINE"):ro" -v "$RUNS:$RUNS")
  for d in "${DATA[@]}"; do MOUNTS+=(-v "$d:$d:ro"); done
  GPU_ARG=all
  [ "$GPUS" -gt 1 ] && GPU_ARG="\"device=$(seq -s, 0 $((GPUS - 1)))\""
  RUN=(docker run --rm --gpus "$GPU_ARG" --shm-size 8g --user "$(id -u):$(id -g)" -e HOME=/tmp
       "${MOUNTS[@]}" -w "$HERE" --entrypoint "${CMD[0]}" "$IMAGE" "${CMD[@]:1}")
  BUILD_CMD=(docker build -f "$KIT/docker/Dockerfile.gpu" -t "$IMAGE" "$KIT")
else
  RUN=("${CMD[@]}")
  [ -z "${DEFECTKIT_PY:-}" ] && [ "$DRY" = 0 ] && [ ! -x "$PY" ] && PY=$(bash "$KIT/scripts/install.sh")/bin/python \
    && RUN[0]=$PY
fi

show() { printf '%q ' "$@"; echo; }
if [ "$DRY" = 1 ]; then
  [ "$BUILD" = 1 ] && [ "$DOCKER" = 1 ] && show "${BUILD_CMD[@]}"
  show "${RUN[@]}"
  exit 0
fi
if [ "$DOCKER" = 1 ]; then
  command -v docker >/dev/null || die "docker is not installed here; use --no-docker to train on this host"
  [ "$BUILD" = 1 ] && "${BUILD_CMD[@]}"
fi
exec "${RUN[@]}"
