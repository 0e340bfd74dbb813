"""Sweep tile shapes, warps and pipeline stages of the kernels on one pattern (GPU only).

    python benchmarks/tune_configs.py --seq-len 32768 --out results/
    python benchmarks/tune_configs.py --pattern dilated_reordered --blocks 64x64 --passes dq dkdv

Prints one row per (layout tile, pass, num_warps, num_stages) with the median time and the
effective TFLOP/s on the pattern's non-zeros, and writes them to ``tune_<gpu>.csv``. The winners
belong in ``blocksparse_fsa/kernels/config.py``.
"""

import argparse
import csv
import itertools
import os

import torch
from triton.testing import do_bench

import blocksparse_fsa as bsa
from blocksparse_fsa_bench import cli as bench
from blocksparse_fsa_bench import patterns as bench_patterns
from blocksparse_fsa.kernels import config as launch_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--pattern", default="sliding_window", choices=bench_patterns.PATTERNS,
                        help="a benchmark pattern (its token order too)")
    parser.add_argument("--window", type=int, default=1024, help="for sliding_window")
    parser.add_argument("--heads-q", type=int, default=32)
    parser.add_argument("--heads-kv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--blocks", nargs="+", default=["64x64", "128x64", "128x128"])
    parser.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3, 4])
    parser.add_argument("--warp-specialize", nargs="+", type=int, default=[0], choices=[0, 1],
                        help="fwd only: 1 asks Triton to warp-specialize the tile loop")
    parser.add_argument("--stack", nargs="+", default=["auto"],
                        help="query heads per forward and dQ program: 'auto' (config.py) or ints")
    parser.add_argument("--passes", nargs="+", default=["fwd", "bwd"],
                        choices=["fwd", "bwd", "dq", "dkdv"],
                        help="bwd: one config for both backward kernels; dq / dkdv: that "
                             "kernel's config only (the other keeps config.py's); all three "
                             "time the whole backward")
    parser.add_argument("--out", default=None,
                        help="output directory (default: a new one under the temporary directory)")
    args = parser.parse_args()
    length, hq, hkv, dim = args.seq_len, args.heads_q, args.heads_kv, args.head_dim
    torch.manual_seed(0)
    q = torch.randn(1, length, hq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, length, hkv, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, length, hkv, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(q)
    build = bench_patterns.PATTERN_BUILDERS[args.pattern]
    extra = dict(window=args.window) if args.pattern == "sliding_window" else {}
    pattern = build(length, hkv, "cuda", **extra)
    rows = []
    default_fwd, default_bwd = launch_config.get_fwd_config, launch_config.get_bwd_config
    default_stack = launch_config.heads_per_program
    for block in args.blocks:
        block_m, block_n = map(int, block.split("x"))
        layout = bsa.build_layout(pattern.indices, length, is_causal=True, block_m=block_m,
                                  block_n=block_n, reorder=pattern.reorder, kernel="tiles")
        flops = 4 * layout.nnz * (hq // layout.heads) * dim
        out = bsa.sparse_attn_func(q, k, v, layout=layout)
        for passname, stack, warps, stages, ws in itertools.product(
                args.passes, args.stack, args.warps, args.stages, args.warp_specialize):
            if ws and (passname != "fwd" or warps < 8):  # sm_90's pass needs 8 warps
                continue
            config = dict(num_warps=warps, num_stages=stages, warp_specialize=bool(ws))
            launch_config.heads_per_program = (
                default_stack if stack == "auto" else (lambda *a, n=int(stack), **kw: n))

            def fwd_config(*a, c=config):
                return c

            def bwd_config(*a, kernel="dkdv", c=dict(num_warps=warps, num_stages=stages),
                           tuned=passname):
                return c if tuned in ("bwd", kernel) else default_bwd(*a, kernel=kernel)

            launch_config.get_fwd_config = fwd_config if passname == "fwd" else default_fwd
            launch_config.get_bwd_config = bwd_config
            try:
                err = None
                if passname == "fwd":
                    # against the default config's output: a miscompiled config is no winner
                    err = (bsa.sparse_attn_func(q, k, v, layout=layout) - out).abs().max().item()
                    ms = do_bench(lambda: bsa.sparse_attn_func(q, k, v, layout=layout),
                                  warmup=10, rep=40, return_mode="median")
                    work = flops
                else:
                    out = bsa.sparse_attn_func(q, k, v, layout=layout)
                    ms = do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout,
                                                              retain_graph=True),
                                  warmup=10, rep=40, return_mode="median")
                    work = 2.5 * flops
                row = dict(block=block, pass_=passname, stack=stack, num_warps=warps,
                           num_stages=stages, warp_specialize=ws, max_err=err, ms=round(ms, 4),
                           tflops=round(work / ms / 1e9, 1), density=round(layout.density, 4))
            except Exception as e:  # noqa: BLE001 (out of resources etc.: report, go on)
                row = dict(block=block, pass_=passname, stack=stack, num_warps=warps,
                           num_stages=stages, warp_specialize=ws, ms=None, tflops=None,
                           density=round(layout.density, 4),
                           error=f"{type(e).__name__}: {str(e)[:200]}")
            rows.append(row)
            print(row, flush=True)
    launch_config.get_fwd_config, launch_config.get_bwd_config = default_fwd, default_bwd
    launch_config.heads_per_program = default_stack
    args.out = args.out or str(bench.default_out_dir())
    os.makedirs(args.out, exist_ok=True)
    slug = torch.cuda.get_device_name().replace(" ", "_")
    suffix = "" if args.pattern == "sliding_window" else f"_{args.pattern}"
    with open(os.path.join(args.out, f"tune_{slug}{suffix}.csv"), "x", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({key for r in rows for key in r}))
        writer.writeheader()
        writer.writerows(rows)
    for passname in args.passes:
        best = min((r for r in rows if r["pass_"] == passname and r["ms"]), key=lambda r: r["ms"])
        print(f"best {passname}: {best}")


if __name__ == "__main__":
    main()
