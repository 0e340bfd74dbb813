"""Time the layout build from GPU indices: numba (host), PyTorch and Triton (GPU).

    python benchmarks/time_layout_build.py                      # the benchmark's sliding window
    python benchmarks/time_layout_build.py --dtype int64 --pattern topk_random
    python benchmarks/time_layout_build.py --sweep --out results/   # Triton configs

The indices come from ``blocksparse_fsa_bench.patterns`` (``(1, Hkv, L, W)`` on the GPU,
int32 there; ``--dtype int64`` converts them). Every build is first compared with the PyTorch
build, tensor for tensor: a mismatch is reported and not timed. GPU times are medians of
``triton.testing.do_bench``; ``build_layout`` rows include the host sync and the transposed
lists (repeated builds of one shape reuse the last one's tile counts and sync once, at the end;
``first`` forgets them each call: a sync after pass 1 and exact allocations), ``tiles only``
rows are the builders' tile lists alone (``no window scan``: without the sliding-window
shortcut of pass 1). numba is timed with
``time.perf_counter`` (median of 3 after a warm-up) and includes copying the indices to the
host; ``(host)`` rows time a synced call with ``perf_counter`` (median of 20). ``--flex`` adds
flex's compiled ``create_block_mask`` on the pattern's ``mask_mod`` on both timers.
``--sweep`` adds one row per Triton launch config (tiles only) and names the fastest.
For ``sliding_window``, ``analytic window_layout, fresh`` rows time the layout that
``sparse_attn_func(window_size=(W - 1, 0), is_causal=True)`` builds without indices (one head,
checked against the indices' first head), each call uncached (the layout cache cleared first).
``--device cpu`` (with ``TRITON_INTERPRET=1``, small ``--seq-len``) is a smoke test.
"""

import argparse
import csv
import itertools
import os
import statistics
import time

import torch

import blocksparse_fsa as bsa
from blocksparse_fsa_bench import cli as bench
from blocksparse_fsa_bench import patterns as bench_patterns
from blocksparse_fsa.preprocess.triton import config as tiles_config
from blocksparse_fsa.preprocess.torch import indices_to_tiles_torch
from blocksparse_fsa.preprocess.triton import forget_capacities, indices_to_tiles_triton

LAYOUT_TENSORS = ["full_ptr", "full_col", "part_ptr", "part_col", "masks", "full_ptr_t",
                  "full_row_t", "part_ptr_t", "part_row_t", "part_mask_t", "nnz"]
TILE_NAMES = ["full_ptr", "full_col", "part_ptr", "part_col", "masks", "nnz"]
SWEEP = dict(CHUNK=(16, 32), num_warps=(4,), maxnreg=(128, 168), programs_per_sm=(4, 8, 16))


def first_difference(got, want):
    """Name of the first differing tensor of two layouts or two builder outputs, or None."""
    if isinstance(want, tuple):
        pairs = zip(TILE_NAMES, got, want)
    else:
        pairs = ((n, getattr(got, n), getattr(want, n)) for n in LAYOUT_TENSORS)
    for name, a, b in pairs:
        same = (a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                if isinstance(a, torch.Tensor) else a == b)
        if not same:
            return name
    return None


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def host_ms(fn, device, runs=3):
    fn()
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_ms(fn, device, rep=200):
    if device != "cuda":
        return host_ms(fn, device)
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def profile(fn, device, runs=5):
    """Where ``fn``'s time goes: host wall time per call (synced) and the kernel table."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    print(f"host wall time, synced: {host_ms(fn, device, runs):.3f} ms")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(runs):
            fn()
        sync(device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"profile of {runs} calls:")
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))


def time_flex(pattern, heads_q, length, device, rows, gpu, commit, args):
    """Flex's compiled ``create_block_mask`` on the pattern's analytic ``mask_mod`` (what the
    benchmark's flex rows use; it reads no indices), on the same two timers as ours."""
    mask_mod, heads = bench.flex_mask_mod(pattern, heads_q)
    make = bench.compiled_create_block_mask()

    def fn():
        return make(mask_mod, None, heads, length, length, device=device)

    fn()  # compile
    for name, ms in (("flex create_block_mask", gpu_ms(fn, device)),
                     ("flex create_block_mask (host)", host_ms(fn, device, runs=20))):
        rows.append(dict(gpu=gpu, commit=commit, pattern=args.pattern, seq_len=length,
                         dtype=args.dtype, block="128x128", method=name, ms=ms, status="ok"))
        print(f"{name:28s} {ms:10.3f} ms  (heads {heads or 1})", flush=True)


def analytic_window(length, window, block_m, block_n, device):
    """A fresh build of the layout ``sparse_attn_func(window_size=(window - 1, 0),
    is_causal=True)`` uses: the layout cache is cleared first, so no call hits it."""
    from blocksparse_fsa.api import window as window_api

    def fn():
        window_api.clear_cache()
        return window_api.window_layout(length, length, (window - 1, 0, 0), True, device,
                                        block_m, block_n)
    return fn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="sliding_window", choices=bench.PATTERNS)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--heads-kv", type=int, default=8)
    parser.add_argument("--block", default="64x64")
    parser.add_argument("--dtype", default="int32", choices=["int32", "int64"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["numba", "torch"],
                        help="builds not to time (the PyTorch build is still the reference)")
    parser.add_argument("--sweep", action="store_true", help="time Triton launch configs")
    parser.add_argument("--flex", action="store_true",
                        help="also time flex's compiled create_block_mask for the pattern (its "
                             "mask_mod, query heads --heads-q) with the same timers")
    parser.add_argument("--heads-q", type=int, default=32)
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's kernel table of the Triton build_layout")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="folder for layout_build_<gpu>.csv")
    args = parser.parse_args()
    device = args.device
    block_m, block_n = map(int, args.block.split("x"))
    pattern = bench_patterns.PATTERN_BUILDERS[args.pattern](args.seq_len, args.heads_kv, device)
    idx = pattern.indices.to(getattr(torch, args.dtype)).contiguous()
    length = pattern.seq_len
    gpu = torch.cuda.get_device_name() if device == "cuda" else device
    import triton
    commit = bench.git_commit()  # BSA_COMMIT on a copy of the tree without .git
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, commit {commit}; "
          f"{args.pattern} L={length} Hkv={args.heads_kv}, indices {tuple(idx.shape)} "
          f"{args.dtype} ({idx.nbytes / 2**20:.0f} MiB), {block_m}x{block_n} tiles")

    def build(method):
        return bsa.build_layout(idx, length, is_causal=True, block_m=block_m, block_n=block_n,
                                method=method)

    def tiles(config=None):
        return indices_to_tiles_triton(idx, length, length, True, block_m, block_n,
                                       config=config)

    want = build("torch")
    want_tiles = indices_to_tiles_torch(idx, length, length, True, block_m, block_n)
    print(f"layout: {want.num_tiles} tiles ({want.num_full_tiles} full), nnz {want.nnz}")
    rows = []

    def run(name, fn, reference, timer, **extra):
        bad = first_difference(fn(), reference)
        ms = None if bad else timer(fn)
        status = f"MISMATCH in {bad}" if bad else "ok"
        rows.append(dict(gpu=gpu, commit=commit, pattern=args.pattern, seq_len=length,
                         dtype=args.dtype, block=args.block, method=name, ms=ms,
                         status=status, **extra))
        shown = f"{ms:10.3f} ms" if ms is not None else "   not timed"
        print(f"{name:28s} {shown}  {status}  {extra or ''}", flush=True)
        return ms

    on_gpu = lambda fn: gpu_ms(fn, device)  # noqa: E731
    run("triton build_layout", lambda: build("triton"), want, on_gpu)
    run("triton build_layout (host)", lambda: build("triton"), want,
        lambda fn: host_ms(fn, device, runs=20))
    run("triton build_layout, first", lambda: (forget_capacities(), build("triton"))[1], want,
        on_gpu)
    run("triton tiles only", tiles, want_tiles, on_gpu)
    default = tiles_config.get_tiles_config(block_m, block_n, idx.shape[-1], idx.element_size())
    run("triton tiles, no window scan", lambda: tiles(dict(default, WINDOW=False)), want_tiles,
        on_gpu)
    if "torch" not in args.skip:
        run("torch build_layout", lambda: build("torch"), want, on_gpu)
        run("torch tiles only",
            lambda: indices_to_tiles_torch(idx, length, length, True, block_m, block_n),
            want_tiles, on_gpu)
    if "numba" not in args.skip:
        run("numba build_layout (host)", lambda: build("numba"), want,
            lambda fn: host_ms(fn, device))

    if args.pattern == "sliding_window":
        fresh = analytic_window(length, pattern.window, block_m, block_n, device)
        want_head = bsa.build_layout(idx[:, :1], length, is_causal=True, block_m=block_m,
                                     block_n=block_n, method="torch")
        run("analytic window_layout, fresh", fresh, want_head, on_gpu)
        run("analytic window_layout, fresh (host)", fresh, want_head,
            lambda fn: host_ms(fn, device, runs=20))
    if args.flex:
        time_flex(pattern, args.heads_q, length, device, rows, gpu, commit, args)
    if args.profile:
        profile(lambda: build("triton"), device)
    if args.sweep:
        print(f"default Triton config: {default}")
        timed = []
        for values in itertools.product(*SWEEP.values()):
            config = dict(default, **dict(zip(SWEEP, values)))
            try:
                ms = run("triton sweep", lambda: tiles(config), want_tiles,
                         lambda fn: gpu_ms(fn, device, rep=50), **config)
            except Exception as e:  # noqa: BLE001 - a config that fails to compile or launch
                print(f"triton sweep {config}: {type(e).__name__}: {str(e)[:200]}")
                continue
            if ms is not None:
                timed.append((ms, config))
        if timed:
            print("fastest:", min(timed, key=lambda t: t[0]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"layout_build_{gpu.replace(' ', '_')}.csv")
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "x", newline="") as f:  # never over an existing (committed) result
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
