# Device: bitbasis distill on CUDA, resumable across calls (checkpoint /tmp/bb/TAG.pt), stopped after
# LIMIT seconds (default 540) so that the call returns; rerun the same line to continue. Held-out
# perplexity every EVAL steps goes to $OUT/TAG.evals.jsonl; a finished file comes back in 15 MB parts.
# usage: LIMIT=540 [BBPY=python dir] [EVAL_TEXT=held-out text] bash tools/device/qat.sh IN TAG [bitbasis distill options]
set -u
IN=$1; TAG=$2; shift 2
export PYTHONPATH=${BBPY:-$PWD/python} BITBASIS_CACHE=/tmp/bbcache OMP_NUM_THREADS=8
mkdir -p /tmp/bb /tmp/bbcache
[ -f "${EVAL_TEXT:-}" ] && cp "$EVAL_TEXT" /tmp/bbcache/shakespeare-eval.txt
[ -f "$IN" ] && cp "$IN" /tmp/bb/
start=$(date +%s)
timeout $(( ${LIMIT:-540} + 60 )) python3 -m bitbasis distill /tmp/bb/$(basename "$IN") -o /tmp/bb/$TAG.gguf --force \
  --device cuda --time-limit ${LIMIT:-540} --ckpt /tmp/bb/$TAG.pt --eval-log /tmp/bb/$TAG.evals.jsonl "$@" > /tmp/bb/$TAG.log 2>&1
echo "$TAG: rc=$? wall $(( $(date +%s) - start )) s"
tr '\r' '\n' < /tmp/bb/$TAG.log | grep -v '^\s*$' | grep -E 'eval|distributed|error|Error' | tail -30
tr '\r' '\n' < /tmp/bb/$TAG.log | grep -v '^\s*$' | tail -2
cp /tmp/bb/$TAG.evals.jsonl $OUT/ 2>/dev/null
tr '\r' '\n' < /tmp/bb/$TAG.log | grep -v '^\s*$' | awk 'NR%20==0' | tail -200 > $OUT/$TAG.log
if [ -z "${NOFILE:-}" ] && grep -q "^wrote" /tmp/bb/$TAG.log; then
  split -b 15000000 -d /tmp/bb/$TAG.gguf $OUT/$TAG.gguf.part && sha256sum /tmp/bb/$TAG.gguf
fi
