"""Benchmark: ``sparse_attn_func`` vs FlexAttention and SDPA on sparse patterns.

Run on one CUDA GPU from the repository root::

    blocksparse-fsa-bench --out results/                   # default sweep (< 8 min on an H200)
    blocksparse-fsa-bench --quick --seq-len 8192 --pattern bigbird
    blocksparse-fsa-bench --out results/ --no-plot
    blocksparse-fsa-bench --pattern examples/bench_my_pattern.py:window_and_globals

(``python -m blocksparse_fsa_bench`` is the same.) It prints one row per (pattern, L, system,
pass) and writes ``<out>/bench_<gpu>.json``, ``.csv`` and ``.png`` (the plot needs matplotlib;
without it a warning is printed). ``--out`` defaults to a new directory under the system's
temporary directory; existing result files are never overwritten unless ``--overwrite``.

Patterns (causal, per KV head, ``attn_indices`` of shape ``(1, Hkv, L, W)`` built on the GPU)
    sliding_window  keys i-1023..i
    bigbird         64-token blocks: 3 local, 2 global, 3 random earlier blocks per query block
    nsa_blocks      NSA-style selection: each 64-query block takes 16 of its causal 64-token key
                    blocks (the first, the 2 local ones including the diagonal, 13 at random)
    dilated         512 keys at stride 4: i, i-4, ..., i-2044
    dilated_reordered  the same; ours builds its layout with the tokens grouped mod 4
    topk_random     1024 random keys of the causal prefix [0, i] per query (with duplicates)

Your own pattern: ``--pattern module:function`` or ``--pattern path/to/file.py:function``,
called as ``function(seq_len, heads_kv, device)`` once per length; it returns ``attn_indices``
``(B|1, Hkv|1, L, W)`` (made causal like the patterns above), a ``SparseLayout`` (used as it
is), or either with a flex ``mask_mod`` as a pair (``h`` = KV head). Without a mask_mod, flex
gets the pattern's exact BlockMask (``SparseLayout.to_flex_block_mask`` at 128x128 tiles).
See ``examples/bench_my_pattern.py`` and ``blocksparse_fsa_bench.patterns.user_pattern``.

Systems, all on the same q, k, v
    ours         ``sparse_attn_func(q, k, v, layout=build_layout(indices, is_causal=True))``:
                 the explicit path, a layout built once (``layout_ms``) and passed to every call
    ours_indices ``sparse_attn_func(q, k, v, attn_indices=indices, is_causal=True)`` on every
                 call: the implicit path. The first call builds the layout (the same build as
                 ours' ``layout_ms``) into the layout cache, keyed on the tensor's identity and
                 version; the timed calls find it there. Its cost per call shows in
                 ``host_us`` next to ours' (GPU time is the same kernels). Skipped for a
                 reordered pattern or one given as a layout.
    flex         ``torch.compile(flex_attention)`` with the tightest BlockMask a user would
                 write: an analytic ``mask_mod`` (sliding window, dilated), a per-head block
                 table (bigbird, nsa_blocks), a bit-packed dense ``[Hkv, L, L/8]`` table
                 (topk_random), all through ``create_block_mask`` at flex's default 128x128
                 blocks (its compiled backward on an H200, D=128, needs blocks of 128)
    flex_flash   ``flex`` on the same BlockMask with ``kernel_options={"BACKEND": "FLASH"}``
                 (FlashAttention-4's CuTe kernels under flex's BlockMask)
    fa4_window   FlashAttention-4 ``flash_attn_func(causal=True, window_size=(W - 1, 0))``,
                 for the sliding-window pattern only
    fa4_varlen   FlashAttention-4 ``flash_attn_varlen_func`` over the packed documents, for the
                 documents pattern only
    fa4_dense_causal  FlashAttention-4 dense causal attention on the same tensors: the
                 utilisation ceiling (timed, not checked; ``dense_tflops`` as sdpa_causal)
                 FA4 systems are skipped, saying why, when ``flash_attn.cute`` does not import
    sdpa_causal  dense causal FlashAttention through SDPA: the cost of ignoring the sparsity
                 (a different function, so timed but not checked)
    sdpa_mask    SDPA with the pattern as a dense boolean ``attn_mask`` (only L <= 8192)
    ours_bias    ours with a learnable ``(B, Hkv, 1, L)`` key bias (timed, not checked: the
                 cost of a bias and of its gradient next to the rows without)

FLOP counting
    ``nnz`` is the number of distinct (query, key) pairs of one (batch, KV head) after the
    causal cut, averaged over KV heads: ``layout.nnz / (layout.batch * layout.heads)``
    (duplicates in the indices count once). Every query head sharing that KV head computes
    ``S = QK^T`` and ``O = PV`` on those pairs, 2 FLOPs per multiply-add, so::

        fwd    = 4 * nnz * D * Hq * B
        fwdbwd = 3.5 * fwd       (backward 2.5x: recompute S, dV, dP, dQ, dK)

    Softmax and exponentials are not counted. ``tflops`` is this pattern FLOP count divided by
    the time, for every system: a system that computes masked-out pairs gets no credit for
    them. For ``sdpa_causal`` the extra column ``dense_tflops`` counts the dense causal work it
    actually does (nnz = L (L + 1) / 2).

Method
    * Before timing, one forward + backward (with a fixed random dO) per system is compared
      with ours: relative error ``||a - b|| / ||b||`` of out (and dq, dk, dv for fwdbwd) must
      be below 2e-2. A failed check gives status ``mismatch`` and no speed-up; ours itself is
      ``ok`` only when an independent system (flex or sdpa_mask) agrees with it.
    * Times are medians of ``triton.testing.do_bench``. When fwdbwd is among the passes the
      forward is timed with autograd enabled (inputs require grad), like the forward of a
      training step: flex then compiles one graph per (pattern, L) for both passes instead of
      two. With ``--passes fwd`` alone the inputs do not require grad.
    * ``layout_ms`` is the steady-state cost of building the pattern's metadata once (ours:
      ``build_layout`` + ``.to(device)``; flex: the mask_mod's tensors + compiled
      ``create_block_mask``; sdpa_mask: the dense mask), the median of 5 calls timed with
      ``perf_counter`` and a synchronize; ``layout_first_ms`` is the first call, including numba /
      torch.compile compilation. ``first_call_s`` is the check run (for flex it includes compiling
      the attention kernels).
    * ``peak_mb`` = ``max_memory_allocated`` during one call of the timed function (forward, or
      forward + backward) minus the memory allocated before it (inputs, layout, masks).
    * ``host_us`` is the host time to issue one call: 20 calls back to back without a
      synchronize (3 to 20: about 100 ms of GPU work), divided by their number (Python,
      argument checks, layout lookup, launches; what a kernel shorter than that cannot hide).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# The names below are also this module's interface for the scripts in benchmarks/ and the tests
# (``from blocksparse_fsa_bench import cli as bench; bench.make_inputs(...)``).
from .measure import (  # noqa: F401
    FWDBWD_FLOP_FACTOR, PASSES, REL_TOL, Progress, Row, bench_ms, check_run, dense_causal_flops,
    finalize, free_memory, host_calls, host_us, pattern_flops, peak_mb, rel_err, run_pattern,
    run_system, tflops)
from .patterns import PATTERNS, load_pattern
from .report import (  # noqa: F401
    REPO, default_out_dir, format_row, git_commit, metadata, plot_results, slug, summary,
    write_results)
from .systems import (  # noqa: F401
    CHECKERS, DENSE_SYSTEMS, DTYPES, FLEX_BLOCK, SYSTEM_SETUPS, SYSTEMS, Inputs, Skipped,
    SystemRun, block_mask_stats, compiled_create_block_mask, compiled_flex_attention,
    flash_attn_cute, flex_block_mask, flex_mask_mod, make_inputs, setup_fa4_dense_causal,
    setup_fa4_varlen, setup_fa4_window, setup_flex, setup_flex_flash, setup_ours,
    setup_ours_indices, setup_sdpa_causal, setup_sdpa_mask, short_error, sync, timed,
    timed_median)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="blocksparse-fsa-bench",
        description="Time sparse_attn_func against FlexAttention and SDPA on sparse patterns "
                    "(one CUDA GPU). FLOPs are counted on the pattern's non-zeros: "
                    "fwd = 4*nnz*D*Hq*B, fwdbwd = 3.5x.")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[8192, 32768], metavar="L",
                    help="sequence lengths (Lq = Lk; default: 8192 32768)")
    ap.add_argument("--pattern", nargs="+", default=list(PATTERNS), metavar="NAME",
                    help=f"patterns: built-in ({', '.join(PATTERNS)}; default: all) or your "
                         "own as module:function or path/to/file.py:function, called as "
                         "function(seq_len, heads_kv, device) and returning attn_indices "
                         "(B|1, Hkv|1, L, W), a SparseLayout, or either with a flex mask_mod "
                         "as a pair (see blocksparse_fsa_bench.patterns.user_pattern)")
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                    metavar="NAME", help=f"systems (default: all of {', '.join(SYSTEMS)})")
    ap.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES),
                    metavar="PASS", help="fwd and/or fwdbwd (default: both)")
    ap.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    ap.add_argument("--heads-q", type=int, default=32, help="query heads (default: 32)")
    ap.add_argument("--heads-kv", type=int, default=8, help="key/value heads (default: 8)")
    ap.add_argument("--head-dim", type=int, default=128, help="head dim (default: 128)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                    help="bf16 (default) or fp16")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default: a new directory under the system's "
                         "temporary directory); existing result files are never replaced")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace result files that already exist in --out")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (warmup 10, rep 30 ms)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    ap.add_argument("--sdpa-mask-max-len", type=int, default=8192,
                    help="largest L at which sdpa_mask builds its dense mask (default 8192)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": smoke tests
    args = ap.parse_args(argv)
    if args.heads_q % args.heads_kv:
        ap.error(f"--heads-q ({args.heads_q}) must be a multiple of --heads-kv ({args.heads_kv})")
    args.warmup, args.rep = (10, 30) if args.quick else (25, 100)
    if args.out is None:
        args.out = default_out_dir()
    args.torch_dtype = DTYPES[args.dtype]
    args.passes = [p for p in PASSES if p in args.passes]
    args.patterns = []  # (row name, builder)
    for spec in args.pattern:
        try:
            args.patterns.append(load_pattern(spec))
        except Exception as exc:  # a typo, an import error in the user's module, ...
            ap.error(f"--pattern {spec}: {type(exc).__name__}: {exc}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    meta = metadata(args, device)
    if not args.overwrite:  # fail before the sweep, not after it
        stem = args.out / f"bench_{slug(meta['gpu'])}"
        taken = [stem.with_suffix(x) for x in (".json", ".csv", ".png")
                 if stem.with_suffix(x).exists()]
        if taken:
            print(f"error: {taken[0]} exists: pass another --out, or --overwrite",
                  file=sys.stderr)
            return 2
    print(f"# {meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"commit {meta['git_commit']} | B={args.batch} Hq={args.heads_q} Hkv={args.heads_kv} "
          f"D={args.head_dim} {meta['dtype']} | warmup {args.warmup} ms, rep {args.rep} ms")
    print(format_row())
    rows: list[Row] = []
    t_start = time.perf_counter()
    progress = Progress(len(args.seq_len) * len(args.patterns) * len(args.systems)
                        * len(args.passes))
    for seq_len in args.seq_len:
        for name, build in args.patterns:
            new = run_pattern(name, build, seq_len, args, device, progress)
            for r in new:
                progress.log(format_row(r), file=sys.stdout)
            rows += new
    progress.close()
    print()
    print("\n".join(summary(rows, args.seq_len, args.sdpa_mask_max_len)))
    paths = write_results(rows, meta, args.out, plot=not args.no_plot, overwrite=args.overwrite)
    print(f"wrote {', '.join(str(p) for p in paths)}  ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
