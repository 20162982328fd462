#!/usr/bin/env bash
# GPU check: run this project's own CUDA training paths end to end on the small embedded model
# (SmolLM2-135M-Instruct), on ShareGPT conversations imported into a throw-away data dir.
# Usage: scripts/gpu-check.sh [--device cuda:N] [--task T] [--steps N] [--keep]   (VENV=dir, default .venv)
#   paths: peft + trl LoRA on CUDA (always), unsloth LoRA on CUDA (when unsloth is installed). One line per
#   path: PASS | FAIL | SKIP. Each runs `specialist-router train --device cuda:N --backend <path>`: data
#   filters, training, the evaluation gate (also on the GPU), adapter saved. `--device` follows `train`:
#   the N-th GPU visible to this process (CUDA_VISIBLE_DEVICES=1 ... --device cuda:0 is physical GPU 1).
# Exit status: 0 every path passed; 1 a path failed; 2 bad usage or no installed venv; 3 no CUDA GPU on this
#   host (nvidia-smi missing, failing or listing no GPU): nothing was run.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DEVICE=cuda:0
TASK=code
STEPS=20
KEEP=0
usage() { echo "[gpu-check] $1; usage: scripts/gpu-check.sh [--device cuda:N] [--task T] [--steps N] [--keep]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --device|--task|--steps)
      [ $# -ge 2 ] || usage "$1 needs a value"
      case "$1" in --device) DEVICE="$2" ;; --task) TASK="$2" ;; --steps) STEPS="$2" ;; esac
      shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,10p' "$0" | cut -c3-; exit 0 ;;
    *) usage "unknown option '$1'" ;;
  esac
done
case "$DEVICE" in cuda|cuda:*) ;; *) echo "[gpu-check] --device must be cuda or cuda:N, got '$DEVICE'" >&2; exit 2 ;; esac
case "$STEPS" in ''|*[!0-9]*|0) echo "[gpu-check] --steps must be a positive integer, got '$STEPS'" >&2; exit 2 ;; esac

# 1) a CUDA host (before anything else)
. scripts/lib/cuda-host.sh  # (the script runs from the repository root)
cuda_host_why
why="$CUDA_HOST_WHY"
if [ -n "$why" ]; then
  echo "[gpu-check] no CUDA GPU on this host: $why. Nothing was run; this check needs an NVIDIA GPU and the GPU" \
       "build (scripts/install.sh --gpu). The CPU paths are covered by scripts/test.sh." >&2
  exit 3
fi
printf '%s\n' "$gpus" | sed 's/^/[gpu-check] /'

# 2) the installed project
PYV="$VENV/bin/python"
if [ ! -x "$PYV" ] || ! "$PYV" -c "import grpc, torch, trl, peft" >/dev/null 2>&1; then
  echo "[gpu-check] no installed project in $VENV (python with torch, trl, peft); run scripts/install.sh --gpu first" >&2
  exit 2
fi
SR=("$PYV" -m cli)  # `specialist-router` of this checkout (run from the repository root)
FAILED=0
line() { echo "$1 $2"; [ "$1" = FAIL ] && FAILED=1; return 0; }
if ! info="$("$PYV" -c "import torch; assert torch.cuda.is_available(), 'torch ' + torch.__version__ + ' sees no GPU (CUDA build: ' + str(torch.version.cuda) + ')'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|', ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())), '| CUDA_VISIBLE_DEVICES=' + repr(__import__('os').environ.get('CUDA_VISIBLE_DEVICES')))" 2>&1)"; then
  line FAIL "torch-cuda: $(printf '%s' "$info" | tail -n 1) (install the GPU build: scripts/install.sh --gpu)"
  exit 1
fi
echo "[gpu-check] $info"

# 3) data: real ShareGPT conversations, classified by the default classifier, in a throw-away data dir
WORK="$(mktemp -d -t sr-gpu-check.XXXXXX)"
export SPECIALIST_ROUTER_HOME="$WORK/home"
[ "$KEEP" = 1 ] || trap 'rm -rf "$WORK"' EXIT
echo "[gpu-check] data dir $SPECIALIST_ROUTER_HOME$([ "$KEEP" = 1 ] && echo ' (kept)')"
if ! "${SR[@]}" logs import-sharegpt --limit 2000 --no-progress > "$WORK/import.log" 2>&1; then
  line FAIL "data: logs import-sharegpt failed: $(tail -n 1 "$WORK/import.log")"
  exit 1
fi
echo "[gpu-check] $(tail -n 1 "$WORK/import.log")"

# 4) one training run per path; a REJECTED gate is fine (few steps), what counts is a run on the GPU
run_path() {  # name backend
  local name="$1" backend="$2" run="$WORK/runs/$1"
  "${SR[@]}" train --task "$TASK" --device "$DEVICE" --backend "$backend" --run-dir "$run" --json --no-progress \
    --set max_steps="$STEPS" --set batch_size=4 --set grad_accum=1 --set max_seq_len=512 --set save_steps="$STEPS" \
    --set eval_steps="$STEPS" --set eval_max_records=16 --set forgetting_max_records=4 --set min_records=8 \
    > "$WORK/$name.json" 2> "$WORK/$name.log"
  local rc=$?
  local verdict
  verdict="$("$PYV" - "$WORK/$name.json" "$run" "$backend" "$STEPS" "$rc" <<'EOF'
import json, math, pathlib, sys
report_file, run, backend, steps, rc = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
try:
    r = json.loads(pathlib.Path(report_file).read_text())
except ValueError:
    print(f"FAIL train exited {rc} without a report"); sys.exit()
t, g = r.get("train") or {}, r.get("gate") or {}
problems = []
if r.get("status") not in ("trained", "rejected", "promoted", "deployed"):
    problems.append(f"status {r.get('status')}: {r.get('message', '')[:300]}")
if t.get("backend") != backend:
    problems.append(f"trained with {t.get('backend')!r}, not {backend!r} (see the log: fallback)")
if t.get("steps") != steps:
    problems.append(f"{t.get('steps')} steps instead of {steps}")
losses = [x for _, x in t.get("train_losses") or []]
if not losses or not all(math.isfinite(x) for x in losses):
    problems.append(f"train losses {losses[:3]}...")
if not ((run / "adapter" / "adapter_config.json").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()):
    problems.append("no adapter saved")
if not g:
    problems.append("no gate evaluation")
if problems:
    print("FAIL " + "; ".join(problems))
else:
    print(f"PASS {t['steps']} steps in {t['seconds']} s ({t['seconds_per_step']} s/step), loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}, gate {g.get('candidate_loss', float('nan')):.3f} vs base {g.get('base_loss', float('nan')):.3f} "
          f"({r['status']}), adapter saved")
EOF
)"
  local status="${verdict%% *}" detail="${verdict#* }"
  [ "$status" = PASS ] || detail="$detail | last log line: $(tail -n 1 "$WORK/$name.log")"
  line "$status" "$name ($DEVICE): $detail"
}

run_path peft-trl peft
if "$PYV" -m pip show -q unsloth >/dev/null 2>&1; then
  # unsloth must import on a CUDA host (it raises without a GPU): a failure here is a FAIL, not a skip
  if uerr="$("$PYV" -c "import unsloth" 2>&1)"; then
    run_path unsloth unsloth
  else
    line FAIL "unsloth ($DEVICE): installed but import fails: $(printf '%s' "$uerr" | tail -n 1)"
  fi
else
  line SKIP "unsloth: not installed in $VENV (scripts/install.sh --gpu installs it)"
fi
[ "$KEEP" = 1 ] && echo "[gpu-check] runs and logs kept in $WORK"
exit "$FAILED"
