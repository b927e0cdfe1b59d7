#!/usr/bin/env bash
# Build and run the kit's training container with podman, on a machine that cannot pull the official
# PaddlePaddle image or run Docker's engine (see docs/container.md; a GPU machine uses the official image).
#
#   scripts/container.sh build [--install-deps]
#       1. base root filesystem: debootstrap Debian bookworm (minbase + Python 3.11), cached as a tarball under
#          $DEFECTKIT_CACHE/container (default ~/.cache/defectkit/container), keyed by a recipe hash;
#       2. `podman import` it                                   -> localhost/defectkit-rootfs:bookworm-<hash>
#       3. docker/Containerfile.base-local: + paddlepaddle-gpu   -> localhost/defectkit-paddle:2.6.2-local-<hash>
#       4. docker/Dockerfile.gpu FROM that base (PADDLE_IMAGE)   -> localhost/defectkit-gpu:local-<hash>
#       Each step is skipped when its image (or tarball) with the same recipe hash exists. The kit image's hash
#       covers the kit's files too: after a code change only the kit's code layers are rebuilt (podman's layer
#       cache keeps the dependency layers). Host packages it needs (debootstrap, podman, runc) are refused when
#       missing unless --install-deps (then announced and installed with apt-get).
#   scripts/container.sh run [--image IMAGE] [--bind DIR]... [--gpus] [--] CMD...
#       run CMD in the kit image (default: the one `build` makes for this tree; built first if missing):
#       the current folder read-only at the same path (the working directory), each --bind DIR read-write at
#       the same path, as the calling user (HOME=/tmp). --gpus passes every GPU through CDI
#       (--device nvidia.com/gpu=all; needs the NVIDIA Container Toolkit's CDI spec on the host).
#   scripts/container.sh path     print the kit image reference for this tree (what `run` uses)
#
# Needs root (debootstrap; rootful podman). podman runs with this script's containers.conf (runc, cgroupfs,
# no default ulimits: the default crun cannot set RLIMIT_NOFILE in this kind of sandbox) unless
# DEFECTKIT_CONTAINERS_CONF names another file, or is `system` (the host's own settings, e.g. on a GPU machine).
set -euo pipefail
shopt -s inherit_errexit   # a failing step inside $(...) stops the script

PROJECT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${DEFECTKIT_CACHE:-$HOME/.cache/defectkit}"
DIR="$CACHE/container"
SUITE=bookworm
MIRROR="${DEFECTKIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# libgomp1: paddle's libpaddle.so links it; ca-certificates: pip reaches PyPI over TLS.
BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates,libgomp1
PADDLE_PIP=paddlepaddle-gpu==2.6.2
ROOTFS_REPO=localhost/defectkit-rootfs
PADDLE_REPO=localhost/defectkit-paddle
KIT_REPO=localhost/defectkit-gpu
# What the kit image copies from the tree (docker/Dockerfile.gpu); their contents key the kit image.
KIT_INPUTS=(pyproject.toml README.md requirements docker/pins.py docker/Dockerfile.gpu
            docker/Dockerfile.gpu.dockerignore defectkit detect compress edge_runtime fleet scripts lines)

log() { printf 'container: %s\n' "$*" >&2; }
die() { printf 'container: error: %s\n' "$*" >&2; exit 2; }

need_root() { [ "$(id -u)" = 0 ] || die "needs root (debootstrap, rootful podman): run it with sudo"; }

# podman's settings for this kind of machine (see the header); written once, used through CONTAINERS_CONF.
podman_conf() {
  if [ -n "${DEFECTKIT_CONTAINERS_CONF:-}" ]; then echo "$DEFECTKIT_CONTAINERS_CONF"; return; fi
  local conf="$DIR/containers.conf"
  if [ ! -f "$conf" ]; then
    mkdir -p "$DIR"
    cat > "$conf.tmp" <<'EOF'
# written by defectkit scripts/container.sh
[containers]
default_ulimits = []
pids_limit = 0

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
EOF
    mv "$conf.tmp" "$conf"
  fi
  echo "$conf"
}
pm() {
  if [ "${DEFECTKIT_CONTAINERS_CONF:-}" = system ]; then podman "$@"   # the host's own podman settings
  else CONTAINERS_CONF="$(podman_conf)" podman "$@"; fi
}

# ---- host packages: announced, and installed only with --install-deps -------------------------------
declare -A WHY=(
  [debootstrap]="builds the base root filesystem (Debian bookworm, Python 3.11)"
  [podman]="imports the root filesystem and builds/runs the images (Docker's engine does not run here)"
  [runc]="the OCI runtime podman uses here (the default crun fails: setrlimit RLIMIT_NOFILE not permitted)"
)
ensure_host_deps() {
  local missing=() pkg
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || missing+=(runc)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$INSTALL_DEPS" != 1 ]; then
    for pkg in "${missing[@]}"; do log "missing host package '$pkg': ${WHY[$pkg]}"; done
    die "install them (apt-get install ${missing[*]}) or pass --install-deps to let this script install them"
  fi
  for pkg in "${missing[@]}"; do log "installing Debian package '$pkg' on this host: ${WHY[$pkg]}"; done
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  for pkg in "${missing[@]}"; do command -v "$pkg" >/dev/null || die "'$pkg' is still missing after apt-get install"; done
}

# ---- recipe hashes ------------------------------------------------------------------------------------
h16() { sha256sum | cut -c1-16; }
rootfs_hash() { echo "rootfs/1 $SUITE $BASE_PACKAGES minbase" | h16; }
paddle_hash() { { rootfs_hash; echo "$PADDLE_PIP"; cat "$PROJECT/docker/Containerfile.base-local"; } | h16; }
kit_hash() {  # file names and contents of everything the kit image copies, minus caches
  { paddle_hash
    (cd "$PROJECT" && find "${KIT_INPUTS[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name '*.egg-info' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum); } | h16
}
kit_image() { echo "$KIT_REPO:local-$(kit_hash)"; }
have_image() { pm image exists "$1"; }

# ---- build steps --------------------------------------------------------------------------------------
build_rootfs() {  # -> the imported root filesystem image
  local hash tar image t0 root
  hash="$(rootfs_hash)"; image="$ROOTFS_REPO:$SUITE-$hash"; tar="$DIR/rootfs-$SUITE-$hash.tar"
  if have_image "$image"; then log "base root filesystem: $image (cached)"; echo "$image"; return; fi
  if [ ! -f "$tar" ]; then
    root="$DIR/rootfs-$SUITE-$hash.d"
    rm -rf "$root"; mkdir -p "$root"
    t0=$SECONDS
    log "debootstrap --variant=minbase --include=$BASE_PACKAGES $SUITE (Debian's registry; ~1-2 min)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$root" "$MIRROR" \
      > "$DIR/debootstrap.log" 2>&1 || { tail -n 20 "$DIR/debootstrap.log" >&2; die "debootstrap failed (log: $DIR/debootstrap.log)"; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*_Packages
    tar --numeric-owner --xattrs -C "$root" -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
    rm -rf "$root"
    log "debootstrap + tarball took $((SECONDS - t0)) s ($(du -h "$tar" | cut -f1))"
  fi
  t0=$SECONDS
  pm import --change 'CMD ["/bin/bash"]' --message "defectkit base: debootstrap $SUITE minbase + $BASE_PACKAGES" \
    "$tar" "$image" >/dev/null
  log "imported $image in $((SECONDS - t0)) s"
  echo "$image"
}

host_ca_bundle() {  # the CA bundle pip trusts on this host (a TLS-intercepting proxy adds its CA there)
  local c="${PIP_CERT:-}"
  [ -n "$c" ] || c="$(python3 -m pip config get global.cert 2>/dev/null || true)"
  [ -f "$c" ] || c=/etc/ssl/certs/ca-certificates.crt
  [ -f "$c" ] && echo "$c"
  return 0
}

podman_build() {  # podman build with the settings this kind of machine needs
  # --isolation chroot: RUN steps need no OCI runtime or cgroups; --network host: RUN steps reach PyPI through
  # the host's network; the host's CA bundle is mounted over the image's during RUN steps only (not baked in),
  # so pip trusts what the host trusts (PIP_CERT points at it: docker/Containerfile.base-local).
  local ca extra=()
  ca="$(host_ca_bundle)"
  [ -n "$ca" ] && extra+=(-v "$ca:/etc/ssl/certs/ca-certificates.crt:ro")
  pm build --isolation chroot --network host --layers "${extra[@]}" "$@"
}

build_paddle() {  # $1 rootfs image -> the paddle base image
  local image t0
  image="$PADDLE_REPO:2.6.2-local-$(paddle_hash)"
  if have_image "$image"; then log "paddle base: $image (cached)"; echo "$image"; return; fi
  t0=$SECONDS
  log "building $image: $PADDLE_PIP from PyPI (a 760 MB wheel) on $1"
  podman_build -f "$PROJECT/docker/Containerfile.base-local" --build-arg ROOTFS_IMAGE="$1" \
    --build-arg PADDLE_PIP="$PADDLE_PIP" -t "$image" "$PROJECT/docker" >&2
  log "paddle base built in $((SECONDS - t0)) s"
  echo "$image"
}

build_kit() {  # $1 paddle base image -> the kit image
  local image t0
  image="$(kit_image)"
  if have_image "$image"; then log "kit image: $image (cached)"; echo "$image"; return; fi
  t0=$SECONDS
  log "building $image from docker/Dockerfile.gpu with PADDLE_IMAGE=$1"
  podman_build -f "$PROJECT/docker/Dockerfile.gpu" --ignorefile "$PROJECT/docker/Dockerfile.gpu.dockerignore" \
    --build-arg PADDLE_IMAGE="$1" -t "$image" "$PROJECT" >&2
  log "kit image built in $((SECONDS - t0)) s"
  echo "$image"
}

build() {
  need_root
  ensure_host_deps
  mkdir -p "$DIR"
  exec 9>"$DIR/build.lock"; flock 9   # one builder at a time (tests may run in parallel)
  local rootfs paddle kit
  rootfs="$(build_rootfs)"
  paddle="$(build_paddle "$rootfs")"
  kit="$(build_kit "$paddle")"
  log "ready: $kit ($(pm image inspect --format '{{.Size}}' "$kit" | awk '{printf "%.2f GB", $1/1e9}'))"
  echo "$kit"
}

run() {
  local image="" gpus=0 rw=() mounts=() d here
  while [ $# -gt 0 ]; do
    case "$1" in
      --image) image="${2:?--image needs a name}"; shift 2 ;;
      --bind) [ -d "${2:-}" ] || die "--bind ${2:-}: no such directory"; rw+=("$(realpath "$2")"); shift 2 ;;
      --gpus) gpus=1; shift ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  [ $# -gt 0 ] || die "run: no command given (usage: container.sh run [--image IMAGE] [--bind DIR]... [--gpus] [--] CMD...)"
  need_root
  if [ -z "$image" ]; then image="$(kit_image)"; have_image "$image" || image="$(build)"; fi
  here="$(pwd)"
  mounts=(-v "$here:$here:ro")
  for d in "${rw[@]}"; do mounts+=(-v "$d:$d"); done
  local extra=()
  [ "$gpus" = 1 ] && extra+=(--device nvidia.com/gpu=all)
  pm run --rm --ulimit host --network none --shm-size 8g --user "$(id -u):$(id -g)" -e HOME=/tmp \
    "${mounts[@]}" "${extra[@]}" -w "$here" --entrypoint "$1" "$image" "${@:2}"
}

INSTALL_DEPS=0
case "${1:-}" in
  build) shift; [ "${1:-}" = --install-deps ] && { INSTALL_DEPS=1; shift; }
         [ $# -eq 0 ] || die "build: unknown argument '$1'"
         build ;;
  run) shift; run "$@" ;;
  path) kit_image ;;
  -h|--help|help|"") sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command '$1' (build|run|path)" ;;
esac
