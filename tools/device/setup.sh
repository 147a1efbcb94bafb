# Device call 2: assemble the teacher GGUF, install gguf, materialize SmolLM2 under /tmp/bbcache, print its digest.
set -e
cat /tmp/bb/smol.part.aa .dev/smol.part.ab > /tmp/bb/smol.gguf
sha256sum /tmp/bb/smol.gguf
python3 -m pip install --no-deps --no-index -q .dev/gguf-*.whl 2>&1 | tail -2
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
export PYTHONPATH=$PWD/python BITBASIS_CACHE=/tmp/bbcache
python3 -c "from pathlib import Path; from bitbasis import hf; hf.materialize_from_gguf(Path('/tmp/bb/smol.gguf'), hf.cache_dir()/'SmolLM2-135M-Instruct', pre='smollm')" 2>&1 | tail -2
python3 .dev/digest.py /tmp/bbcache/SmolLM2-135M-Instruct
