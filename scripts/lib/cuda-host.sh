# Sourced by install.sh --gpu and gpu-check.sh: sets CUDA_HOST_WHY to why this host is not a CUDA host ("" if it is).
cuda_host_why() {
  local gpus
  CUDA_HOST_WHY=""
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    CUDA_HOST_WHY="nvidia-smi is not on PATH (no NVIDIA driver on this host)"
  elif ! gpus="$(timeout 60 nvidia-smi -L 2>&1)"; then
    CUDA_HOST_WHY="nvidia-smi failed: $(printf '%s' "$gpus" | head -n 1)"
  elif ! printf '%s\n' "$gpus" | grep -q '^GPU '; then
    CUDA_HOST_WHY="nvidia-smi lists no GPU"
  fi
}
