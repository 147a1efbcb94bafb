#!/usr/bin/env bash
# Set up (tools/setup.sh test) and run the whole test suite. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh test
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider tests "$@"
