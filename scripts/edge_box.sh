#!/usr/bin/env bash
# Build (once, cached) and use an edge-box root filesystem: Debian bullseye, Python 3.9, Paddle Lite 2.13rc0,
# ONNX Runtime, numpy, opencv-python-headless, cryptography and the kit's edge_runtime in /opt/edge.
# PyPI has paddlelite only for Python <= 3.10, so the kit converts and runs .nb files in here (STACK.md).
#
#   scripts/edge_box.sh [--arch ARCH] [build] [--install-deps] [ROOT]
#                                              build or refresh (default ROOT: $DEFECTKIT_CACHE/edgebox-bullseye-py39);
#                                              a missing debootstrap is refused unless --install-deps (then announced)
#   scripts/edge_box.sh [--arch ARCH] run [--root ROOT] [--bind PATH]... [--] CMD...
#                                              run CMD inside the box: project read-only at /opt/defectkit,
#                                              /proc mounted, PYTHONPATH=/opt/defectkit, each --bind PATH
#                                              read-write at the same path. Mounts live in a private mount
#                                              namespace (unshare), so they vanish when CMD ends, even on a crash.
#   scripts/edge_box.sh [--arch ARCH] path     print the default ROOT
# ARCH: amd64 (default) or arm64. The arm64 box ($DEFECTKIT_CACHE/edgebox-bullseye-py39-arm64) has ONNX Runtime
# only (PyPI has no aarch64 paddlelite). On a host of another architecture it is built with debootstrap --foreign
# and entered with `proot -q qemu-aarch64-static` (every exec goes through qemu; no binfmt_misc needed): Debian
# packages qemu-user-static and proot. Timings inside an emulated box mean nothing.
# Needs root (debootstrap, chroot, mount). A second build with the same recipe only refreshes edge_runtime.
set -euo pipefail

PROJECT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${DEFECTKIT_CACHE:-$HOME/.cache/defectkit}"
SUITE=bullseye
MIRROR="${DEFECTKIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Pins chosen because they have cp39 manylinux wheels that run on bullseye's glibc 2.31, for x86_64 and (all but
# paddlelite) for aarch64 (onnxruntime 1.19.2 aarch64 needs glibc 2.27+).
COMMON_PIP=(numpy==1.23.5 opencv-python-headless==4.8.1.78 onnxruntime==1.19.2 cryptography==43.0.3)
STAMP_NAME=.defectkit-edgebox-recipe
BOX_PROJECT=/opt/defectkit   # where `run` mounts the project

log() { printf 'edge_box: %s\n' "$*" >&2; }
die() { printf 'edge_box: error: %s\n' "$*" >&2; exit 2; }

set_arch() {  # ARCH, the default ROOT, the wheels, and how to enter the box (chroot, or proot + qemu)
  case "$1" in
    amd64|x86_64) ARCH=amd64 ;;
    arm64|aarch64) ARCH=arm64 ;;
    *) die "--arch $1: unknown architecture (use amd64 or arm64)" ;;
  esac
  if [ "$ARCH" = amd64 ]; then
    DEFAULT_ROOT="$CACHE/edgebox-bullseye-py39"
    PIP_PACKAGES=(paddlelite==2.13rc0 "${COMMON_PIP[@]}")
    IMPORT_CHECK="import paddlelite.lite, onnxruntime, cv2, numpy, cryptography"
    QEMU=qemu-x86_64-static
  else
    DEFAULT_ROOT="$CACHE/edgebox-bullseye-py39-arm64"
    PIP_PACKAGES=("${COMMON_PIP[@]}")   # no paddlelite: PyPI has no aarch64 wheel
    IMPORT_CHECK="import onnxruntime, cv2, numpy, cryptography"
    QEMU=qemu-aarch64-static
  fi
  local host
  host="$(dpkg --print-architecture 2>/dev/null || uname -m)"
  case "$host" in x86_64) host=amd64 ;; aarch64) host=arm64 ;; esac
  FOREIGN=0; [ "$host" = "$ARCH" ] || FOREIGN=1
}

need_emulator() {  # a foreign box runs through qemu-user under proot (no binfmt_misc on these hosts)
  [ "$FOREIGN" = 1 ] || return 0
  local missing=() pkg
  command -v "$QEMU" >/dev/null || missing+=(qemu-user-static)
  command -v proot >/dev/null || missing+=(proot)
  [ ${#missing[@]} = 0 ] && return 0
  [ "${INSTALL_DEPS:-0}" = 1 ] || die "the $ARCH box on this $(uname -m) host needs $QEMU and proot: install the \
Debian packages ${missing[*]} (apt-get install ${missing[*]}; \`make test\` does, via scripts/host_deps.sh) or \
let this script install them: scripts/edge_box.sh --arch $ARCH build --install-deps"
  for pkg in "${missing[@]}"; do log "installing Debian package '$pkg' on this host: it runs the $ARCH box's programs"; done
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

need_root() { [ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount): run it with sudo"; }

# The pip index settings the host uses, replicated inside the box. file:// mirrors are bind-mounted read-only
# during the install; the public index is reached directly when no index-url is configured.
host_pip_conf() {
  local key val
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ndefault-timeout = 180\ndisable-pip-version-check = 1\n'
  for key in index-url extra-index-url find-links; do
    val="$(pip_config_get "$key")"
    [ -n "$val" ] && printf '%s = %s\n' "$key" "$val"
  done
  return 0
}

pip_config_get() {  # value of a global pip setting: environment first, then pip's config files
  local key="$1" env="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  if [ -n "${!env:-}" ]; then echo "${!env}"; return; fi
  if command -v pip >/dev/null; then pip config get "global.$key" 2>/dev/null || true
  else python3 -m pip config get "global.$key" 2>/dev/null || true; fi
}

local_pip_dirs() {  # directories behind file:// URLs and plain paths in the pip settings
  host_pip_conf | sed -n 's/^\(index-url\|extra-index-url\|find-links\) = //p' | tr ' ' '\n' \
    | sed -n 's#^file://##p; s#^\(/.*\)#\1#p' \
    | while read -r d; do
        d="${d%/}"; [ "${d##*/}" = simple ] && d="${d%/simple}"   # index pages link to ../../files
        [ -d "$d" ] && echo "$d"
      done | sort -u
  return 0
}

recipe_hash() {  # the amd64 line is unchanged so existing x86 boxes stay valid
  local arch=""; [ "$ARCH" = amd64 ] || arch=" arch=$ARCH"
  { echo "$SUITE ${PIP_PACKAGES[*]} python3,python3-pip,python3-venv$arch"; host_pip_conf; } | sha256sum | cut -c1-16
}

# Runs "$@" in a private mount namespace with ROOT's /proc, /tmp and the given binds set up, then chroots.
# Args: ROOT RO_BINDS(newline list "src dst") RW_BINDS(newline list of paths) -- CMD...
IN_BOX_SCRIPT='
set -euo pipefail
root="$1" ro="$2" rw="$3"; shift 3
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
while read -r src dst; do
  [ -n "$src" ] || continue
  mkdir -p "$root$dst"; mount --bind "$src" "$root$dst"; mount -o remount,bind,ro "$root$dst"
done <<< "$ro"
while read -r p; do
  [ -n "$p" ] || continue
  mkdir -p "$root$p"; mount --bind "$p" "$root$p"
done <<< "$rw"
if [ "${BOX_SYS:-0}" = 1 ]; then  # read-only /sys: ONNX Runtime aarch64 (cpuinfo) aborts at import without it
  mount --rbind /sys "$root/sys"; mount -o remount,bind,ro "$root/sys"
fi
enter=(chroot "$root")
# A foreign box: proot (-q) starts every program of the root through qemu-user (no binfmt_misc needed).
[ -z "${BOX_QEMU:-}" ] || enter=(proot -q "$BOX_QEMU" -r "$root" -w /)
exec "${enter[@]}" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/edge/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  PYTHONPATH="${BOX_PYTHONPATH:-}" PYTHONDONTWRITEBYTECODE=1 "$@"
'
in_box() {
  local root="$1" ro="$2" rw="$3"; shift 4
  local qemu="" sys=0; [ "$FOREIGN" = 1 ] && qemu="$QEMU"; [ "$ARCH" = arm64 ] && sys=1
  BOX_QEMU="$qemu" BOX_SYS="$sys" unshare --mount --propagation private --fork -- /bin/bash -c "$IN_BOX_SCRIPT" in_box "$root" "$ro" "$rw" "$@"
}

refresh_edge_runtime() {  # the kit's edge_runtime, copied (not linked) so the box stands alone
  local root="$1" site
  site="$(ls -d "$root"/opt/edge/lib/python3*/site-packages | head -n1)"
  rm -rf "$root/opt/edge/kit.new"; mkdir -p "$root/opt/edge/kit.new"
  cp -r "$PROJECT/edge_runtime" "$root/opt/edge/kit.new/"
  find "$root/opt/edge/kit.new" -name __pycache__ -prune -exec rm -rf {} +
  rm -rf "$root/opt/edge/kit.old"; [ -d "$root/opt/edge/kit" ] && mv "$root/opt/edge/kit" "$root/opt/edge/kit.old"
  mv "$root/opt/edge/kit.new" "$root/opt/edge/kit"; rm -rf "$root/opt/edge/kit.old"
  echo /opt/edge/kit > "$site/defectkit-edge-runtime.pth"
}

build() {
  local root="${1:-$DEFAULT_ROOT}" want t0
  need_root
  mkdir -p "$(dirname "$root")"
  exec 9>"$root.lock"; flock 9   # one builder/refresher at a time (tests may run in parallel)
  want="$(recipe_hash)"
  if [ -f "$root/$STAMP_NAME" ] && [ "$(cat "$root/$STAMP_NAME")" = "$want" ]; then
    refresh_edge_runtime "$root"; log "up to date ($root, recipe $want); edge_runtime refreshed"; return 0
  fi
  if [ -e "$root" ]; then
    log "recipe changed or build unfinished: rebuilding $root"
    # Refuse to delete something that is not one of our boxes (or holds live mounts).
    [ -d "$root/opt" ] || [ -d "$root/debootstrap" ] || [ -z "$(ls -A "$root")" ] \
      || die "$root exists and is not an edge box: remove it or pass another ROOT"
    if grep -q " $(realpath "$root")/" /proc/mounts; then die "$root has mounts in use: unmount them first"; fi
    rm -rf "$root"
  fi
  if ! command -v debootstrap >/dev/null; then
    [ "$INSTALL_DEPS" = 1 ] || die "debootstrap is missing on this host: install it (apt-get install debootstrap; \
\`make test\` does, via scripts/host_deps.sh) or pass --install-deps to let this script install it"
    log "installing Debian package 'debootstrap' on this host: it builds the edge-box root filesystem"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  need_emulator
  mkdir -p "$root"
  t0=$SECONDS
  local foreign=(); [ "$FOREIGN" = 1 ] && foreign=(--foreign "--arch=$ARCH")
  log "debootstrap $SUITE ($ARCH) into $root"
  debootstrap "${foreign[@]}" --variant=minbase --include=python3,python3-pip,python3-venv "$SUITE" "$root" "$MIRROR" \
    > "$root.debootstrap.log" 2>&1 || { tail -n 20 "$root.debootstrap.log" >&2; die "debootstrap failed (log: $root.debootstrap.log)"; }
  if [ "$FOREIGN" = 1 ]; then
    # Second stage inside the box, under qemu. DEBOOTSTRAP_DIR is set because its own `[ -x ]` probe fails under proot.
    log "debootstrap --second-stage under $QEMU (slow: every dpkg and maintainer script is emulated)"
    in_box "$root" "" "" -- /bin/sh -c 'DEBOOTSTRAP_DIR=/debootstrap exec /debootstrap/debootstrap --second-stage' \
      >> "$root.debootstrap.log" 2>&1 || { tail -n 20 "$root.debootstrap.log" >&2; die "debootstrap --second-stage failed (log: $root.debootstrap.log)"; }
  fi
  log "debootstrap took $((SECONDS - t0)) s"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  host_pip_conf > "$root/etc/pip.conf"
  local ro="" d
  for d in $(local_pip_dirs); do ro+="$d $d"$'\n'; done
  t0=$SECONDS
  log "pip install ${PIP_PACKAGES[*]}"
  in_box "$root" "$ro" "" -- /bin/sh -c \
    "python3 -m venv /opt/edge && /opt/edge/bin/pip install -q --no-cache-dir $(printf "'%s' " "${PIP_PACKAGES[@]}")" >&2
  log "pip took $((SECONDS - t0)) s"
  in_box "$root" "" "" -- /opt/edge/bin/python -c \
    "$IMPORT_CHECK; import platform; print('edge box ok', platform.machine(), onnxruntime.__version__, numpy.__version__)" >&2
  refresh_edge_runtime "$root"
  rm -rf "$root/var/cache/apt/archives/"*.deb
  echo "$want" > "$root/$STAMP_NAME"
  log "built $root (recipe $want)"
}

run() {
  local root="$DEFAULT_ROOT" rw=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --root) root="$2"; shift 2 ;;
      --bind) [ -d "$2" ] || die "--bind $2: no such directory"; rw+="$(realpath "$2")"$'\n'; shift 2 ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  [ $# -gt 0 ] || die "run: no command given (usage: edge_box.sh run [--root ROOT] [--bind PATH]... -- CMD...)"
  need_root
  local arch_opt=""; [ "$ARCH" = amd64 ] || arch_opt="--arch $ARCH "
  [ -f "$root/$STAMP_NAME" ] || die "no edge box at $root: build it first with scripts/edge_box.sh ${arch_opt}build"
  need_emulator
  BOX_PYTHONPATH="$BOX_PROJECT" in_box "$root" "$PROJECT $BOX_PROJECT" "$rw" -- "$@"
}

export BOX_PYTHONPATH="${BOX_PYTHONPATH:-}"
INSTALL_DEPS=0
set_arch amd64
if [ "${1:-}" = --arch ]; then [ $# -ge 2 ] || die "--arch needs a value (amd64 or arm64)"; set_arch "$2"; shift 2; fi
case "${1:-build}" in
  build) shift || true
         while [ $# -gt 0 ]; do
           case "$1" in
             --install-deps) INSTALL_DEPS=1; shift ;;
             --arch) [ $# -ge 2 ] || die "--arch needs a value (amd64 or arm64)"; set_arch "$2"; shift 2 ;;
             *) break ;;
           esac
         done
         build "${1:-}" ;;
  run) shift; run "$@" ;;
  path) echo "$DEFAULT_ROOT" ;;
  -h|--help|help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) build "$1" ;;
esac
