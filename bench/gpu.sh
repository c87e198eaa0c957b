#!/usr/bin/env bash
# The GPU benchmarks in one go, written to one results file (bench/results/gpu-<date>.txt):
#   1. pretraining throughput: ours (pretrain(), Lightning, bf16-mixed) vs the tuned bare lightly loop (bf16 autocast,
#      channels-last, the same data path), several rounds      -> bench/pretrain_throughput.py --device cuda
#   2. embedding throughput: Embedder vs the tuned bare forward; cache; streaming -> bench/embed_throughput.py --device cuda
#   3. a DDP pretraining on all visible GPUs: `taxomoco pretrain` with PRETRAIN_DEVICES=all PRETRAIN_STRATEGY=ddp
#      (and on one GPU with the same budget when there are several, for the speed-up)
#   4. the RQ worker on CUDA: a real redis-server and Label Studio, a training enqueued through the product's
#      queue and run by `taxomoco worker --burst --device cuda`   -> bench/worker_queue.py
#
# Usage: bench/gpu.sh [--dry-run] [--out FILE]
#   Without CUDA it stops at once with exit code 2. --dry-run runs every step on the CPU at a tiny size (what
#   tests/test_gpu_bench.py runs) and writes to a temporary file unless --out is given.
# Needs: `make install-test redis-server label-studio` (the .venv, redis-server, Label Studio in .ls-venv).
# Environment: PYTHON (default .venv/bin/python), GPU_BENCH_MINUTES (pretraining budget of steps 3 and 4, default 1.5).
# A failing step is recorded in the results file with its log's tail; the others still run; the exit code is 1.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument $1 (use --dry-run, --out FILE)" >&2; exit 64 ;;
  esac
  shift
done

if [ $DRY = 0 ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "bench/gpu.sh: no CUDA GPU visible to $PY (nvidia-smi and torch.cuda.is_available()); nothing was run." >&2
    echo "  Run it on a machine with an NVIDIA GPU and a CUDA build of torch, or try 'bench/gpu.sh --dry-run' (CPU, tiny sizes)." >&2
    exit 2
  fi
fi

STAMP=$(date -u +%Y-%m-%d-%H%M)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/taxomoco-gpu-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
if [ -z "$OUT" ]; then
  if [ $DRY = 1 ]; then OUT=$WORK/gpu-dryrun-$STAMP.txt; else OUT=$ROOT/bench/results/gpu-$STAMP.txt; fi
fi
mkdir -p "$(dirname "$OUT")"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
MINUTES=${GPU_BENCH_MINUTES:-1.5}
FAILED=0

if [ $DRY = 1 ]; then
  DEV=cpu
  PRETRAIN_ARGS=(--device cpu --batch 8 --steps 2 --warmup 1 --images 32 --bank 16 --repeats 1 --threads 1 --plan-epochs 2)
  EMBED_ARGS=(--device cpu --n 64 --batch 32 --stream-n 128 --rounds 1 --repeat 1 --threads 1)
  DDP_IMAGES=64; DDP_PX=64; DDP_DEVICES=2; DDP_FLAGS=(--max-minutes 0.1 --epochs 1 --batch-size 16)
  WORKER_ARGS=(--dry-run)
else
  DEV=cuda
  # the product's GPU defaults: resnet18-half at 96 px, batch 128, memory bank 4096, loader workers 0
  PRETRAIN_ARGS=(--device cuda --size 96 --image-px 128 --batch 128 --bank 2048 --steps 40 --warmup 5 --images 4096 --repeats 3 --threads 4)
  EMBED_ARGS=(--device cuda --size 96 --image-px 128 --batch 256 --n 8192 --stream-n 20000 --rounds 3 --repeat 2 --threads 4)
  DDP_IMAGES=8192; DDP_PX=128; DDP_DEVICES=all; DDP_FLAGS=(--max-minutes "$MINUTES")
  WORKER_ARGS=(--device cuda --tasks 2000 --labelled 200 --pretrain-minutes "$MINUTES")
fi

{
  echo "# GPU benchmarks (bench/gpu.sh)$([ $DRY = 1 ] && echo ' -- DRY RUN on the CPU at tiny sizes: no figure here means anything')"
  echo
  echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "Command: \`bench/gpu.sh $([ $DRY = 1 ] && echo --dry-run)\` (GPU_BENCH_MINUTES=$MINUTES) at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM; load: $(uptime)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "GPUs:"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | sed 's/^/  /'
  fi
  "$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, visible GPUs {torch.cuda.device_count()}")'
  echo
} >"$OUT"

step() {  # step NAME LOGFILE -- command ... : run, append its result file or its failure to $OUT
  local name=$1 result=$2; shift 3
  local log=$WORK/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '-').log
  echo "== $name" >&2
  local t0=$SECONDS
  if "$@" >"$log" 2>&1 && { [ -z "$result" ] || [ -s "$result" ]; }; then
    { echo "## $name ($((SECONDS - t0)) s)"; echo; [ -n "$result" ] && sed '1{/^# /d}' "$result"; echo; } >>"$OUT"
  else
    FAILED=1
    { echo "## $name: FAILED after $((SECONDS - t0)) s"; echo; echo '```'; tail -n 40 "$log"; echo '```'; echo; } >>"$OUT"
    echo "   FAILED: see $OUT" >&2
  fi
}

step "1. Pretraining throughput: ours vs the tuned bare lightly loop ($DEV)" "$WORK/pretrain.txt" -- \
  "$PY" bench/pretrain_throughput.py "${PRETRAIN_ARGS[@]}" --out "$WORK/pretrain.txt"

step "2. Embedding throughput: Embedder vs the tuned bare forward ($DEV)" "$WORK/embed.txt" -- \
  "$PY" bench/embed_throughput.py "${EMBED_ARGS[@]}" --out "$WORK/embed.txt"

ddp() {  # the DDP pretraining through the product's CLI; one line per run into $WORK/ddp.txt
  "$PY" bench/worker_queue.py --write-images "$WORK/ddp-images" --images "$DDP_IMAGES" --px "$DDP_PX" || return 1
  local runs=("$DDP_DEVICES")
  local gpus
  gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
  [ $DRY = 0 ] && [ "$gpus" -gt 1 ] && runs+=(1)
  {
    echo "Images: $DDP_IMAGES synthetic ${DDP_PX}px PNGs; settings: DEVICE=$DEV PRETRAIN_STRATEGY=ddp, flags ${DDP_FLAGS[*]};"
    echo "command: \`PRETRAIN_DEVICES=N PRETRAIN_STRATEGY=ddp DEVICE=$DEV python -m ml_backend.cli pretrain DIR --out ENC --no-resume ${DDP_FLAGS[*]}\`"
    echo
    echo "| PRETRAIN_DEVICES | wall s (whole command) | what the command printed (rank 0) |"
    echo "|---|---|---|"
  } >"$WORK/ddp.txt"
  for n in "${runs[@]}"; do
    local t0=$SECONDS
    PRETRAIN_DEVICES=$n PRETRAIN_STRATEGY=ddp DEVICE=$DEV TORCH_THREADS=${TORCH_THREADS:-0} \
      "$PY" -m ml_backend.cli pretrain "$WORK/ddp-images" --out "$WORK/ddp-enc-$n" --no-resume "${DDP_FLAGS[@]}" \
      >"$WORK/ddp-$n.log" 2>&1 || { cat "$WORK/ddp-$n.log"; return 1; }
    cat "$WORK/ddp-$n.log"
    local said
    said=$(grep -m1 '^pretrained encoder' "$WORK/ddp-$n.log" || echo "no summary line")
    echo "| $n | $((SECONDS - t0)) | $said |" >>"$WORK/ddp.txt"
  done
  grep -h -m1 -i 'GPU available\|distributed_backend\|world_size\|Initializing distributed' "$WORK"/ddp-*.log \
    | sed 's/^/    /' >>"$WORK/ddp.txt" || true
}
step "3. DDP pretraining on all visible devices (taxomoco pretrain, $DEV)" "$WORK/ddp.txt" -- ddp

step "4. RQ worker on $DEV: a training through the product's queue" "$WORK/worker.txt" -- \
  "$PY" bench/worker_queue.py "${WORKER_ARGS[@]}" --out "$WORK/worker.txt"

echo "Load at the end: $(uptime)" >>"$OUT"
echo "results: $OUT" >&2
[ $DRY = 1 ] && cat "$OUT"
exit $FAILED
