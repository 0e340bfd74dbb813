"""Gather kernels vs the tile walker, per pass, with an optional config sweep (GPU).

    python benchmarks/bench_gather.py                      # 3 patterns at L=32768, defaults
    python benchmarks/bench_gather.py --sweep --pattern topk_random
    python benchmarks/bench_gather.py --seq-len 8192 --pattern topk_random dilated bigbird

For each pattern (the builders of ``blocksparse_fsa_bench.patterns``, causal): layout and
gather-index build times and sizes, ``gather_stats`` (tile density next to the gather paths'
slot density), then
the median ms and effective TFLOP/s (pattern non-zeros: 4 nnz D Hq forward, 2.5x that
backward) of each pass: tile ``fwd`` / ``bwd`` (``sparse_attn_fwd`` / ``sparse_attn_bwd``) and
gather ``fwd`` / ``bwd`` / ``dkdv`` (dK/dV alone; dQ + delta = bwd - dkdv). The gather outputs
and gradients are checked against the tile walker before anything is timed (relative error
< 2e-2); a mismatch is reported and not timed. ``--sweep`` times every combination of the
listed BLOCK_N / warps / stages (forward and dQ) and ROWS / head_split / warps / stages (dK/dV)
by overriding ``kernels.config.get_gather_config``. Rows go to ``<out>/bench_gather_<gpu>.csv``.
"""

import argparse
import csv
import itertools
import math
import sys
import time
from pathlib import Path

import torch

from blocksparse_fsa_bench import cli as bench
from blocksparse_fsa_bench import patterns as bench_patterns
from blocksparse_fsa.layout.gather_index import build_gather_index, gather_stats
from blocksparse_fsa.kernels import config as launch_config
from blocksparse_fsa.kernels import (gather_attn_bwd, gather_attn_bwd_dkdv, gather_attn_fwd,
                                    sparse_attn_bwd, sparse_attn_fwd)
from blocksparse_fsa.layout import build_layout

DEFAULT_PATTERNS = ["topk_random", "dilated", "sliding_window"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--pattern", nargs="+", choices=bench.PATTERNS, default=DEFAULT_PATTERNS)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads-q", type=int, default=32)
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(bench.DTYPES), default="bf16")
    ap.add_argument("--sweep", action="store_true", help="time the config grid below too")
    ap.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 64, 128],
                    help="dK/dV rows (queries x heads) per step")
    ap.add_argument("--head-split", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--quick", action="store_true", help="warmup 10 ms, rep 30 ms")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: a new one under the temporary directory)")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": smoke tests
    args = ap.parse_args(argv)
    args.warmup, args.rep = (10, 30) if args.quick else (25, 100)
    return args


def sweep_configs(args, kernel: str) -> list[dict]:
    """The config overrides to time for ``kernel`` (``{}`` = config.py's choice)."""
    configs = [{}]
    if args.sweep and kernel in ("fwd", "dq"):
        configs += [dict(BLOCK_N=n, num_warps=w, num_stages=s)
                    for n, w, s in itertools.product(args.block_n, args.warps, args.stages)]
    if args.sweep and kernel == "dkdv":
        group = args.heads_q // args.heads_kv
        configs += [dict(ROWS=r, head_split=h, num_warps=w, num_stages=s)
                    for r, h, w, s in itertools.product(args.rows, args.head_split, args.warps,
                                                        args.stages) if group % h == 0]
    return configs


def with_config(kernel: str, override: dict):
    """Make ``get_gather_config`` return ``override`` on top of its choice for ``kernel``."""
    default = launch_config.get_gather_config

    def patched(name, head_dim, heads):
        cfg = dict(default(name, head_dim, heads))
        return {**cfg, **override} if name == kernel else cfg
    launch_config.get_gather_config = patched
    return default


def run_pattern(name: str, args, device) -> list[dict]:
    dtype = bench.DTYPES[args.dtype]
    pattern = bench_patterns.PATTERN_BUILDERS[name](args.seq_len, args.heads_kv, device)
    inp = bench.make_inputs(args.batch, args.seq_len, args.heads_q, args.heads_kv,
                            args.head_dim, dtype, device, requires_grad=False)
    q, k, v, dout = inp.q, inp.k, inp.v, inp.dout
    scale = 1.0 / math.sqrt(args.head_dim)
    build = (lambda: build_layout(pattern.indices, args.seq_len, is_causal=True,
                                  reorder=pattern.reorder, kernel="tiles").to(device))
    bench.timed(build, device)  # compilation
    layout, layout_ms = bench.timed(build, device)
    gidx, gidx_ms = bench.timed(lambda: build_gather_index(layout), device)
    stats = gather_stats(layout, gidx, block_n=64, block_q=16)
    nnz = layout.nnz / (layout.batch * layout.heads)
    flops = bench.pattern_flops(nnz, args.batch, args.heads_q, args.head_dim, "fwd")
    base = dict(pattern=name, seq_len=args.seq_len, layout_ms=round(layout_ms, 1),
                gather_index_ms=round(gidx_ms, 1), layout_mb=round(layout.nbytes / 2**20, 1),
                gather_index_mb=round(gidx.nbytes / 2**20, 1),
                **{key: round(val, 4) if isinstance(val, float) else val
                   for key, val in stats.items()})

    # correctness first: gather vs tile walker (out and gradients)
    out_t, lse_t = sparse_attn_fwd(q, k, v, layout, scale)
    grads_t = sparse_attn_bwd(dout, q, k, v, out_t, lse_t, None, layout, scale)[:3]
    out_g, lse_g = gather_attn_fwd(q, k, v, gidx, scale)
    grads_g = gather_attn_bwd(q, k, v, out_g, lse_g, dout, gidx, scale)
    errors = {n: bench.rel_err(a, b) for n, a, b in
              zip(["out", "dq", "dk", "dv"], [out_g, *grads_g], [out_t, *grads_t])}
    worst = max(errors.values())
    if not worst < bench.REL_TOL:
        return [dict(base, system="gather", pass_="all", status="mismatch",
                     note=" ".join(f"{n}={e:.2e}" for n, e in errors.items()))]
    del grads_t, grads_g

    # dK/dV alone needs delta = rowsum(dO * O): computed once here
    delta = (out_g.float() * dout.float()).sum(-1).transpose(1, 2).contiguous()
    passes = {
        ("tile", "fwd", None): lambda: sparse_attn_fwd(q, k, v, layout, scale),
        ("tile", "bwd", None): lambda: sparse_attn_bwd(dout, q, k, v, out_t, lse_t, None,
                                                       layout, scale),
        ("gather", "fwd", "fwd"): lambda: gather_attn_fwd(q, k, v, gidx, scale),
        ("gather", "bwd", "dq"): lambda: gather_attn_bwd(q, k, v, out_g, lse_g, dout, gidx,
                                                         scale),
        ("gather", "dkdv", "dkdv"): lambda: gather_attn_bwd_dkdv(
            q, k, v, dout, lse_g, delta, gidx, scale),
    }
    rows = []
    for (system, pass_name, kernel), fn in passes.items():
        for override in (sweep_configs(args, kernel) if kernel else [{}]):
            default = with_config(kernel, override) if kernel else None
            try:
                ms = bench.bench_ms(fn, (), args, device)
                status = "ok"
            except Exception as e:  # noqa: BLE001 (out of resources etc.: report, go on)
                ms, status = None, bench.short_error(e)
            finally:
                if default is not None:
                    launch_config.get_gather_config = default
            work = flops * {"fwd": 1.0, "bwd": 2.5}.get(pass_name, 0.0)
            rows.append(dict(base, system=system, pass_=pass_name, status=status,
                             config=" ".join(f"{key}={val}" for key, val in override.items())
                             or "default", ms=None if ms is None else round(ms, 3),
                             tflops=None if not (ms and work) else round(work / ms / 1e9, 1),
                             max_rel_err=round(worst, 5)))
            print({key: rows[-1][key] for key in ("pattern", "system", "pass_", "config", "ms",
                                                  "tflops", "status")}, flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {gpu} | torch {torch.__version__} | commit {bench.git_commit(bench.REPO)} | "
          f"L={args.seq_len} B={args.batch} Hq={args.heads_q} Hkv={args.heads_kv} "
          f"D={args.head_dim} {args.dtype}")
    rows, t0 = [], time.perf_counter()
    for name in args.pattern:
        rows += run_pattern(name, args, device)
        bench.free_memory()
    for name in args.pattern:  # the best time of each (pattern, system, pass)
        for key in sorted({(r["system"], r["pass_"]) for r in rows if r["pattern"] == name}):
            timed = [r for r in rows if (r["pattern"], r["system"], r["pass_"]) == (name, *key)
                     and r.get("ms")]
            if timed:
                best = min(timed, key=lambda r: r["ms"])
                print(f"best {name} {key[0]} {key[1]}: {best['ms']} ms ({best['config']})")
    out = args.out or bench.default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_gather_{gpu.replace(' ', '_')}.csv"
    with open(path, "x", newline="") as f:  # never over an existing (committed) result
        writer = csv.DictWriter(f, fieldnames=sorted({key for r in rows for key in r}))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
