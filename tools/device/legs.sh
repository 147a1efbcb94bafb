# Session 9's QAT legs on the lent GPU, self-contained: everything lives in /tmp/bb there, so after the
# two transfer calls no carry is needed and the same `go` line continues the runs (resumable
# checkpoints, `--time-limit`) as long as the machine stays warm. Runs three legs at once:
#   q1: N = 1, q2: N = 2, q3: N = 3 (lower lr), rotated GPTQ starts made there (convert --device cuda).
# usage (from the repository root on the device; tools/device/session9_request.md has the exact calls):
#   bash .dev/p1/legs.sh part1 [build]    carry [.dev/p1]: teacher part 1, gguf wheel, texts, scripts, code
#                                         (build: and the engine for `eval`, from the call's repository root)
#   bash .dev/p2/legs.sh go [LIMIT]       carry [.dev/p2]: teacher part 2; setup, starts, training
#   bash /tmp/bb/legs.sh go [LIMIT]       no carry: continue training (stop LIMIT s after the call began)
#   bash /tmp/bb/legs.sh fetch TAG...     no carry: finished files' planes (start_pt.py pack) in 15 MB parts
#   PARTS=0[0-2] bash /tmp/bb/legs.sh file TAG...   a finished file itself in 15 MB parts (cat them together)
#   bash /tmp/bb/legs.sh eval TAG...      no carry: the engine's 40-window perplexity of finished files, there
#                                         (the engine builds from the call's repository root, started by `go`)
set -u
B=${BB:-/tmp/bb}
MODEL=${MODEL:-smollm2} DEV=${DEV:-cuda}              # overridable for a dry run on the CPU with a tiny model
T0=$(date +%s)
LIMIT=${2:-540}
export PYTHONPATH=$B/bbpy BITBASIS_CACHE=${BBCACHE:-/tmp/bbcache} OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bb/out}
mkdir -p $B $BITBASIS_CACHE "$OUT"
here=$(cd "$(dirname "$0")" && pwd)

# the legs: TAG N STEPS LR SIGN_LR [EXTRA distill options...] (session 11's: all calibration text, the
# lever of session 10; q2e trains its embedding and head as 4:64 bases for a small whole file; q1t is
# N = 1 from the teacher's weights on ParetoQ's 1-bit grid (mean |W| per group). Session 10's were
# q3 / q2 (800 steps, --calib-frac 0.5) and q3c (--calib-frac 1); session 9's q1 1 500 / q2 2 700 /
# q3 3 600 with --seqs 4096 --gen-batch 1024 and no calibration text)
# Session 13's: q2o and q1t start from files with the online rotation before ffn_down (§42: GPTQ N = 2
# 113.73 -> 87.02 before training); q3c is §31's best N = 3 leg, longer. The N field names the start:
# "2o" = N = 2 with --online-rotation down. Session 11's plan (never run): q2e 2 1400 ... --embed-bases
# 4:64 --head-bases 4:64, q3c 3 1400, q1t 1 600 --latent teacher --grid paretoq.
LEGS=${LEGS:-"q2o 2o 1800 0.002 0.01
q3c 3 1600 0.001 0.005
q1t 1o 600 0.002 0.01 --latent teacher --grid paretoq"}
COMMON=${COMMON:-"--batch 32 --length 256 --seqs 32768 --calib-frac 1 --gen-batch 2048 --eval-every 100 --eval-windows 8 --train signs --loss cakld --swap 0 --ckpt-every 400 -q"}
# the teacher's generation grows its KV cache a step at a time: without expandable segments the
# allocator's cache of outgrown blocks reached 88 GB in the session-10 sweep and starved the other legs
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

left() { echo $(( LIMIT - ($(date +%s) - T0) )); }

# the C++ engine for `eval`, built once from the carried working tree (the call runs in its root) while
# the GPU trains; cffi is not in the device image: its wheels travel in .dev/p1
build_engine() {
    [ -f $B/engine.done ] && return 0
    [ -f CMakeLists.txt ] || { echo "build: run from the repository root"; return 1; }
    python3 -c "import cffi" 2>/dev/null || python3 -m pip install --no-deps --no-index -q $B/cffi-*.whl $B/pycparser-*.whl 2>&1 | tail -2
    nice cmake -S . -B $B/build -G Ninja -DCMAKE_BUILD_TYPE=Release > $B/build.log 2>&1 &&
        nice cmake --build $B/build --target bitbasis -j ${BUILD_JOBS:-4} >> $B/build.log 2>&1 &&
        cp cpp/include/bitbasis.h $B/bbpy/bitbasis/ && touch $B/engine.done    # the binding's header, same tree
    [ -f $B/engine.done ] && echo "engine built" || { echo "engine build failed:"; tail -5 $B/build.log; return 1; }
}

case $1 in
part1)
    cp -r "$here"/. $B/                                   # smol.part.aa, wheel, texts, bbpy, scripts
    ls -la $B; df -h /tmp | tail -1
    [ "${2:-}" = build ] && BUILD_JOBS=${BUILD_JOBS:-16} build_engine    # the engine now, while nothing trains
    ;;
go)
    [ -d "$here" ] && [ "$here" != "$B" ] && cp -r "$here"/. $B/
    if [ ! -f $B/bbpy/bitbasis/__init__.py ]; then
        echo "error: /tmp/bb is empty: the machine was restarted; run the part1 call again, then go with carry .dev/p2"; exit 1
    fi
    cp -n $B/shakespeare-*.txt $BITBASIS_CACHE/ 2>/dev/null
    if [ ! -f $B/setup.done ]; then
        if [ ! -f $B/smol.part.ab ]; then echo "error: teacher part 2 missing: run go with carry [.dev/p2]"; exit 1; fi
        cat $B/smol.part.aa $B/smol.part.ab > $B/smol.gguf && sha256sum $B/smol.gguf
        python3 -m pip install --no-deps --no-index -q $B/gguf-*.whl 2>&1 | tail -2
        python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
        python3 -c "from pathlib import Path; from bitbasis import hf; hf.materialize_from_gguf(Path('$B/smol.gguf'), hf.cache_dir()/'SmolLM2-135M-Instruct', pre='smollm')" 2>&1 | tail -2
        python3 $B/digest.py $BITBASIS_CACHE/SmolLM2-135M-Instruct          # must be 785e20b3e653276b
        touch $B/setup.done
    fi
    # the rotated teacher once (the converts below would race to make it), then its digest
    python3 -c "from bitbasis import hf; print(hf.rotated_checkpoint(hf.resolve_model_dir('$MODEL'), 0, progress=None))" > $B/rotdir
    python3 $B/digest.py $(cat $B/rotdir)                                  # rotated: see tools/device/session9_request.md
    if grep -q '^[^ ]* [0-9]o ' <<< "$LEGS"; then                          # and with the online rotation (convert's spec)
        python3 -c "from bitbasis import hf; from bitbasis.rotate import online_block; d = hf.resolve_model_dir('$MODEL'); \
print(hf.rotated_checkpoint(d, 0, progress=None, online={'ffn_down': {'block': online_block(int(hf.load_config(d)['intermediate_size'])), 'seed': 0}}))" > $B/rotdir_online
        python3 $B/digest.py $(cat $B/rotdir_online)
    fi
    # the starts: rotation + GPTQ N-bit as QBB planes (§14's step 1 with the default rotation), in parallel
    for n in $(awk '{print $2}' <<< "$LEGS" | sort -u); do
        online=; [ "${n%o}" != "$n" ] && online="--online-rotation down"
        [ -f $B/start$n.gguf ] || (python3 -m bitbasis convert $MODEL -o $B/start$n.gguf --method qbb --bases ${n%o} --group ${GROUP:-192} $online \
            --opt init=gptq --opt rounds=0 --opt iters=0 --opt compensate=0 --opt refit=false \
            ${CALIB:---calib-samples 32 --calib-seqlen 512} --device $DEV --no-check -q > $B/start$n.log 2>&1; echo "start$n rc=$?") &
    done
    wait
    for n in $(awk '{print $2}' <<< "$LEGS" | sort -u); do tail -3 $B/start$n.log; done
    build_engine > $B/build.out 2>&1 &
    # the legs, each stopping at a checkpoint when this call's LIMIT is near (--time-limit counts training
    # only: the first fresh leg first spends ~1-2 min on the teacher's data, which the legs of the same
    # data settings then share: they start once its checkpoint, written after the data, exists)
    first=1
    while read tag n steps lr slr extra; do
        [ -f $B/$tag.gguf ] && continue
        over=40; [ -f $B/$tag.pt ] || [ $first = 0 ] || over=${OVER:-150}   # OVER: the data's time (--calib-frac 1: ~40 s)
        tl=$(( $(left) - 60 - over ))
        [ $tl -lt 30 ] && { echo "$tag: no time left in this call"; continue; }
        echo "$tag: training for up to $tl s"
        timeout $(( $(left) - 20 )) python3 -m bitbasis distill $B/start$n.gguf -o $B/$tag.gguf --force --device $DEV --model $MODEL \
            --steps $steps --lr $lr --sign-lr $slr $COMMON $extra --time-limit $tl --ckpt $B/$tag.pt \
            --eval-log $B/$tag.evals.jsonl >> $B/$tag.log 2>&1 &
        if [ $first = 1 ] && [ ! -f $B/$tag.pt ]; then
            pid=$!
            for i in $(seq 120); do [ -f $B/$tag.pt ] || ! kill -0 $pid 2>/dev/null && break; sleep 2; done
        fi
        first=0
    done <<< "$LEGS"
    wait
    for t in $(awk '{print $1}' <<< "$LEGS"); do
        echo "== $t: $(grep -c . $B/$t.evals.jsonl 2>/dev/null) evals; last: $(tail -1 $B/$t.evals.jsonl 2>/dev/null)"
        grep -E "stopped|wrote|rror|distributed" $B/$t.log | tail -3
        [ -f $B/$t.gguf ] && sha256sum $B/$t.gguf
    done
    nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
    tar czf "$OUT/evals.tgz" -C $B $(cd $B && ls *.evals.jsonl *.log 2>/dev/null)
    ;;
eval)
    shift
    wait; build_engine || exit 1; cat $B/build.out 2>/dev/null
    export BITBASIS_LIB=$(find $B/build -name libbitbasis.so | head -1)
    for t in "$@"; do                  # in parallel, EVAL_THREADS each (the device has 16 cores)
        [ -f $B/$t.gguf ] || { echo "$t: not finished"; continue; }
        python3 -m bitbasis ppl $B/$t.gguf --protocol llamacpp --windows ${EVAL_WINDOWS:-40} --backend engine \
            -t ${EVAL_THREADS:-4} --json ${EVAL_OPTS:-} > $B/$t.ppl.txt 2> $B/$t.ppl.err &
    done
    wait
    for t in "$@"; do [ -f $B/$t.ppl.txt ] && { echo "== $t: $(tail -1 $B/$t.ppl.txt) $(grep -i error $B/$t.ppl.err)"; sha256sum $B/$t.gguf; }; done
    nproc; lscpu | grep -m1 "Model name"; uptime
    tar czf "$OUT/evals.tgz" -C $B $(cd $B && ls *.evals.jsonl *.log *.ppl.txt 2>/dev/null)
    ;;
file)        # a finished file itself in 15 MB parts, PARTS (a glob: 0[0-2]) of them per call: 64 MiB come back
    shift
    for t in "$@"; do
        [ -f $B/$t.gguf ] || { echo "$t: not finished"; continue; }
        [ -f $B/$t.gguf.part00 ] || split -b 15000000 -d $B/$t.gguf $B/$t.gguf.part
        cp $B/$t.gguf.part${PARTS:-*} "$OUT/" && sha256sum $B/$t.gguf
    done
    ls -la "$OUT"
    ;;
fetch)
    shift
    for t in "$@"; do
        [ -f $B/$t.gguf ] || { echo "$t: not finished"; continue; }
        python3 $B/start_pt.py pack $B/$t.gguf $B/$t.pt.pack $(cat $B/rotdir) && \
            split -b 15000000 -d $B/$t.pt.pack "$OUT/$t.pack.part" && sha256sum $B/$t.gguf $B/$t.pt.pack
    done
    tar czf "$OUT/evals.tgz" -C $B $(cd $B && ls *.evals.jsonl *.log 2>/dev/null)
    ls -la "$OUT"
    ;;
*)
    echo "usage: legs.sh part1 [build] | go [LIMIT] | eval TAG... | file TAG... | fetch TAG..."; exit 2 ;;
esac
