#!/usr/bin/env bash
# Install everything (idempotent), start the service with the embedded default (managed vLLM CPU serving
# SmolLM2-135M-Instruct), show real requests through the SDK (base model and a LoRA adapter), keep serving.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_NO_USAGE_STATS=1
exec .venv/bin/specialist-router demo "$@"
