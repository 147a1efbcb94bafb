# Device call 3: bitbasis distill on CUDA (batch 32 x 256 tokens, 4096 teacher sequences), output split into 15 MB parts under $OUT.
# usage: bash .dev/distill.sh IN STEPS TAG [more bitbasis distill options]
set -e
IN=$1; STEPS=$2; TAG=$3; shift 3
export PYTHONPATH=$PWD/python BITBASIS_CACHE=/tmp/bbcache OMP_NUM_THREADS=8
cp $IN /tmp/bb/ 2>/dev/null || true
start=$(date +%s)
timeout 540 python3 -c "import sys; from bitbasis.cli import main; sys.exit(main(sys.argv[1:]))" distill /tmp/bb/$(basename $IN) -o /tmp/bb/$TAG.gguf \
  --device cuda --steps $STEPS --batch 32 --length 256 --seqs 4096 --gen-batch 512 "$@" > /tmp/bb/$TAG.log 2>&1 || echo "distill rc=$?"
echo "wall $(( $(date +%s) - start )) s"
tr '\r' '\n' < /tmp/bb/$TAG.log | grep -v '^\s*$' | awk 'NR%25==0' | tail -40
tr '\r' '\n' < /tmp/bb/$TAG.log | grep -v '^\s*$' | tail -5
tr '\r' '\n' < /tmp/bb/$TAG.log | grep -v '^\s*$' | awk 'NR%10==0' > $OUT/$TAG.log
[ -f /tmp/bb/$TAG.gguf ] && split -b 15000000 -d /tmp/bb/$TAG.gguf $OUT/$TAG.gguf.part && sha256sum /tmp/bb/$TAG.gguf
ls -la $OUT
