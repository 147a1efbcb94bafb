"""`bitbasis bench kernels` and `bitbasis bench compare`: the CLI hook of bitbasis.bench (add_parser(sub) is called by bitbasis.cli).

If another module already registered `bench`, the `kernels` subcommand is added to its subparsers
when it has them; otherwise `bench` is created here with `kernels` as its first subcommand.
"""
from __future__ import annotations

import argparse


def _add_kernels(bsub) -> None:
    p = bsub.add_parser("kernels", help="time the binary-basis GEMV/GEMM kernels against memory bandwidth")
    p.add_argument("--kernels", default=None, help="comma-separated kernel names (default: every supported one)")
    p.add_argument("--planes", default="1,2,3,4", help="plane counts N (default 1,2,3,4)")
    p.add_argument("--groups", default="64,128", help="group sizes G (default 64,128)")
    p.add_argument("--groups-n1", default=None, help="group sizes for N = 1 only (default: --groups)")
    p.add_argument("--ops", default="gemv,gemm", help="gemv (one token) and/or gemm (--tokens tokens); default both")
    p.add_argument("--shapes", default="smollm2,llama2-7b", help="shape sets (smollm2, llama2-7b) or ROWSxCOLS, comma-separated")
    p.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    p.add_argument("--tokens", type=int, default=128, help="tokens of the GEMM (prompt) case (default 128)")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of repetitions per case (default 0.2)")
    p.add_argument("--footprint-mib", type=float, default=None,
                   help="each case cycles through tensor copies totalling this many MiB, so weights stream from "
                        "memory as in a real model (default: 4x the L3 cache, at most 512 MiB; 0: time one cache-hot copy)")
    p.add_argument("--flags", type=int, default=1,
                   help="format flags of the timed tensors: OFFSET=1, COLMASK=2, ELEMCLASS=4, POW2=16 (default 1)")
    p.add_argument("--json", default=None,
                   help="write the results here (rewritten after every case; meta.complete is false until the end)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="draw throughput vs N per kernel (GEMV: %% of read bandwidth, GEMM: GOP/s) into this PNG")
    p.add_argument("--lib", default=None, help="libbitbasis.so to load (default: BITBASIS_LIB or the built package)")
    p.add_argument("--runner", default=None, metavar="CMD",
                   help="time through this bench_kernels program instead of --lib, e.g. a cross-compiled build: "
                        "'qemu-aarch64 -cpu max ./bench_kernels_aarch64' (tools/neon_test.sh --bench); "
                        "a qemu-* command labels the results emulated")
    p.add_argument("--smoke", action="store_true", help="a tiny subset in seconds (checks the output format)")
    p.add_argument("--quiet", action="store_true", help="print only the final table")

    def _run(args):
        from .. import bench
        return bench.main_kernels(args)
    p.set_defaults(func=_run)


def _add_compare(bsub) -> None:
    p = bsub.add_parser("compare", help="merge `bench kernels` (or `bench e2e`) JSON of several machines into one table")
    p.add_argument("files", nargs="+", metavar="JSON", help="results of `bench kernels --json` (or all of `bench e2e --json`)")
    p.add_argument("--metric", default=None,
                   help="kernels: gops (default), gbs, pct (%% of each machine's read bandwidth), us; "
                        "e2e: decode (default), prompt")
    p.add_argument("--per-kernel", action="store_true",
                   help="one row per kernel (default: the fastest kernel of each machine per case)")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw the comparison into this PNG")
    p.add_argument("--json", default=None, help="write the merged table here")

    def _run(args):
        from .. import bench
        return bench.main_compare(args)
    p.set_defaults(func=_run)


def _add_plot(bsub) -> None:
    p = bsub.add_parser("plot", help="draw a saved `bench kernels --json` result (as --plot would)")
    p.add_argument("file", metavar="JSON")
    p.add_argument("output", metavar="PNG")

    def _run(args):
        from .. import bench
        return bench.main_plot(args)
    p.set_defaults(func=_run)


def add_parser(sub) -> None:
    bench = sub.choices.get("bench") if hasattr(sub, "choices") else None
    if bench is None:
        bench = sub.add_parser("bench", help="benchmarks (bench kernels: the binary-basis kernels)")
    bsub = None
    for action in bench._actions:   # reuse an existing subparsers action of `bench`
        if isinstance(action, argparse._SubParsersAction):
            bsub = action
    if bsub is None:
        bsub = bench.add_subparsers(dest="bench_what", metavar="WHAT")
        bsub.required = True
    _add_kernels(bsub)
    _add_compare(bsub)
    _add_plot(bsub)
    from ..bench_e2e import add_command as _add_e2e   # `bench e2e` lives in bench_e2e.py
    _add_e2e(bsub)
