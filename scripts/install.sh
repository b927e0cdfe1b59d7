#!/usr/bin/env bash
# Create or reuse the kit's virtual environment and install what is missing.
# The venv lives outside the checkout (default ~/.cache/defectkit/venv-<hash>) so that a fresh clone
# on the same machine reuses it; the hash covers everything that decides what gets installed.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 3>&1 1>&2   # everything goes to stderr; only the venv path goes to stdout (the Makefile captures it)
PY=${PYTHON:-python3}
hash=$(cat pyproject.toml requirements/nodeps.txt scripts/install.sh | sha256sum | cut -c1-12)
VENV=${DEFECTKIT_VENV:-$HOME/.cache/defectkit/venv-$hash}
stamp="$VENV/.defectkit-installed"
if [ ! -f "$stamp" ]; then
  echo "defectkit: installing into $VENV (first run on this machine: a few minutes)" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip "setuptools<70" wheel
  # The pinned stack (see pyproject.toml and ../shared/design/STACK.md); numpy pinned first so nothing pulls numpy 2.
  "$VENV/bin/python" -m pip install -q "numpy==1.23.5"
  "$VENV/bin/python" -m pip install -q -e ".[train,edge,fleet,vdl,dev]"
  # paddledet and paddleslim declare broken metadata (sklearn==0.0, opencv<=4.6): install without deps.
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements/nodeps.txt
  "$VENV/bin/python" -c "import zlib, paddle, ppdet, paddleslim, paddle2onnx, onnxruntime" >/dev/null 2>&1 \
    || { echo "defectkit: the installed stack does not import; see the pip output above" >&2; exit 1; }
  touch "$stamp"
else
  # Same requirements: only point the editable install at this checkout (fast).
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
fi
echo "$VENV" >&3
