#!/usr/bin/env bash
# The test oracle venv: NVIDIA kvpress 0.5.5 needs transformers < 5.3, SGLang 0.5.23 pins 5.19, so
# kvpress lives in its own venv (default .venv-kvpress), used only by tests, never by the server.
# Everything it installs is pinned in requirements/kvpress.txt; rebuilt when that file changes.
set -euo pipefail
cd "$(dirname "$0")/.."
V=${KVPRESS_VENV:-.venv-kvpress}
STAMP="$V/.fairkv-kvpress-$(sha256sum requirements/kvpress.txt | cut -c1-16)"
if [ -f "$STAMP" ] && "$V/bin/python" -c "import kvpress" 2>/dev/null; then exit 0; fi
rm -rf "$V"
python3 -m venv "$V"
"$V/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$V/bin/python" -m pip install -q --disable-pip-version-check -r requirements/kvpress.txt
"$V/bin/python" -c "import kvpress, transformers; print('[kvpress venv]', kvpress.__file__, transformers.__version__)"
touch "$STAMP"
