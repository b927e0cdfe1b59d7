#!/usr/bin/env bash
# The Debian packages the test suite runs for real, installed on the host only when missing, each announced
# with the reason. `make test` calls this; nothing else of the kit installs on the host.
#   ffmpeg       serves a real MJPEG camera stream on loopback (tests/test_sources_stream.py)
#   debootstrap  builds the edge-box root filesystem (scripts/edge_box.sh; Paddle Lite has no Python 3.11 wheel)
#                and the training container's base (scripts/container.sh)
#   podman       builds and runs the training container (tests/test_container.py; Docker's engine does not run here)
#   runc         the OCI runtime podman runs it with (the default crun cannot set RLIMIT_NOFILE in this sandbox)
#   postgresql   the collector's store tests on PostgreSQL: tests/pgserver.py runs initdb + pg_ctl on loopback
#   chromium, chromium-driver
#                the dashboard test drives a real headless Chromium against a real collector (tests/test_dashboard_browser.py)
#   qemu-user-static, proot
#                build and run the arm64 edge box without binfmt_misc (scripts/edge_box.sh --arch arm64): proot -q runs
#                every aarch64 program of the root filesystem through qemu
set -euo pipefail
declare -A WHY=(
  [ffmpeg]="serves a real MJPEG camera stream on loopback for the stream-source tests"
  [debootstrap]="builds the edge-box root filesystem (Debian bullseye, Python 3.9, Paddle Lite) and the training container's base"
  [podman]="builds and runs the training container for tests/test_container.py (scripts/container.sh)"
  [runc]="the OCI runtime scripts/container.sh runs podman with (crun cannot set RLIMIT_NOFILE here)"
  [postgresql]="a real PostgreSQL server on loopback for the collector's store tests (tests/pgserver.py)"
  [chromium]="a real headless browser for the collector dashboard test"
  [chromium-driver]="lets the dashboard test drive that browser (selenium WebDriver; Debian's driver matches Debian's chromium)"
  [qemu-user-static]="runs the arm64 edge box's programs on this x86 host (emulation; no binfmt_misc needed with proot)"
  [proot]="enters the arm64 edge-box root filesystem without root privileges or binfmt_misc, through qemu"
)
missing=()
for pkg in ffmpeg debootstrap podman runc chromium proot; do
  command -v "$pkg" >/dev/null || missing+=("$pkg")
done
# packages whose programs are not on PATH: checked by a file they install
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || missing+=(postgresql)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
[ ${#missing[@]} -eq 0 ] && exit 0
for pkg in "${missing[@]}"; do echo "defectkit: installing Debian package '$pkg' on this host: ${WHY[$pkg]}" >&2; done
[ "$(id -u)" = 0 ] || { echo "defectkit: needs root to install ${missing[*]}: sudo apt-get install ${missing[*]}" >&2; exit 2; }
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
