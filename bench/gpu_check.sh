#!/bin/bash
# GPU check for the LLM benches, run on a lent accelerator machine that has torch/transformers/peft but no
# network. The embedded GGUF (98 MB) is larger than one transfer, so it travels in two parts (prepared here
# in the git-ignored .gpu/: .gpu/a = first part; .gpu/b = second part + the ML-100K asset files + the gguf
# wheel) over two calls:
#
#   bash bench/gpu_check.sh stash   # call 1, carry .gpu/a: keeps part 1 under /root while the machine is warm
#   bash bench/gpu_check.sh run     # call 2, carry .gpu/b: joins, installs gguf, runs the benches into $OUT
#
# Prepare .gpu/ with:  split -b 50000000 -d <cached gguf> gguf.part-  (part-00 -> .gpu/a, part-01 -> .gpu/b),
# tar -cf .gpu/b/ml-100k.tar -C $RECALIGN_HOME/assets ml-100k-1.2.1, and `pip download --no-deps gguf` into .gpu/b.
set -uo pipefail
STASH=${STASH:-/root/recalign-stash}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$STASH" "$OUT"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"

if [ "${1:-}" = stash ]; then
  cp .gpu/a/* "$STASH"/ && ls -la "$STASH"
  exit 0
fi

cp .gpu/b/* "$STASH"/
export RECALIGN_HOME=${GPU_RECALIGN_HOME:-/root/recalign-home} PYTHONUNBUFFERED=1 RECALIGN_QUIET=1 RECALIGN_THREADS=8
ASSETS=$RECALIGN_HOME/assets
mkdir -p "$ASSETS/smollm2-135m-instruct-0.1.2"
cat "$STASH"/gguf.part-* > "$ASSETS/smollm2-135m-instruct-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
tar -xf "$STASH/ml-100k.tar" -C "$ASSETS"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STASH"/gguf-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
python3 -c "from recalign import assets; [assets.fetch(n, verify=True) for n in ('ml-100k', 'smollm2-135m-instruct')]; print('assets verified')" || exit 1
[ -n "${DRY:-}" ] && exit 0

log() { echo "=== $* ($(date +%T))"; }
# Measured on an H100 (2026-11-26): GGUF conversion 2 s; scoring bench below ~50 s; the TALLRec bench ran ICL +
# 16 shots x 3 seeds in ~150 s with the prefix cache on (it is off on CUDA by default now: 2.4x faster
# training). Budget: call 2 with timeout_s 580 fits the scoring bench and the TALLRec bench at the CPU settings.
log "scoring bench, float32"
timeout 90 python3 bench/llm_scoring.py --dtype float32 --samples 64 --batch-size 32 --rounds 2 \
  --train-examples 16 --results "$OUT/llm_scoring_gpu.json" 2>&1 | grep -v Warn | tail -14
log "LLM tests on CUDA"
timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_llm.py 2>&1 | tail -3
log "TALLRec bench, the CPU settings (2,000 test, 128 valid, 3 seeds; the JSON holds what finished)"
timeout 380 python3 bench/tallrec.py --shots 16,64,256 --seeds 3 --test-size 2000 --valid-size 128 \
  --set model.batch_size=32 --work /root/work-small --results "$OUT/tallrec_gpu.json" 2>&1 | grep -v -i warn | tail -16
log done
