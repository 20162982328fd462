#!/usr/bin/env bash
# Install everything (idempotent) and run the whole test suite against real parts
# (real vLLM CPU server, real gRPC on loopback, real SQLite, real training steps).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_NO_USAGE_STATS=1
exec .venv/bin/python -m pytest tests -p no:cacheprovider -q -rfEs --durations=15 "$@"
