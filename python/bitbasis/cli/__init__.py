"""The `bitbasis` command: one module per subcommand (as llama.cpp's tools/<tool>/), each with
`add_parser(sub)` that registers it and a `run(args)` it dispatches to."""
from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from . import bench, chat, convert, data, demo, distill, export, generate, info, ppl, serve
from ._common import parse_opts, print_summary  # noqa: F401 (used by callers of the old cli module)

COMMANDS = (convert, distill, export, info, ppl, data, demo, generate, chat, serve, bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitbasis", description=(
        "Quantize Hugging Face LLMs into ~1-2.5 bit binary-basis GGUF files and run them on the CPU. "
        "MODEL may be 'smollm2' (the embedded SmolLM2-135M-Instruct) or an HF checkpoint directory."))
    p.add_argument("--version", action="version", version=f"bitbasis {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for mod in COMMANDS:
        mod.add_parser(sub)
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        return a.func(a) or 0
    except KeyboardInterrupt:
        print("bitbasis: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, FileExistsError, ImportError, RuntimeError) as e:
        if os.environ.get("BITBASIS_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"bitbasis: error: {msg}", file=sys.stderr)
        return 1
