"""Where the time of one fresh analytic window layout goes (``sparse_attn_func(window_size=)``'s
build, uncached), step by step on the host, and the whole build synced.

    python benchmarks/window_build_stamps.py [--seq-len 32768] [--window 1023] [--sinks 0]
    TRITON_INTERPRET=1 python benchmarks/window_build_stamps.py --device cpu --seq-len 256 \
        --window 63 --runs 2                                     # CPU smoke run

Each step is stamped with ``time.perf_counter`` (median of ``--runs`` builds after a warm-up);
``whole, synced`` is ``window_layout`` on an empty cache between two ``synchronize`` calls,
as ``bench_varlen.py``'s ``build_fresh_ms``. The steps are those of
``api.window.analytic_layout``; their sum is host time only (the copy and the bit kernel run
asynchronously). Prints the result's layout too, checked against ``window_layout``'s.
"""

import argparse
import statistics
import time

import torch

from blocksparse_fsa.api import window as window_mod
from blocksparse_fsa.layout import SparseLayout
from blocksparse_fsa.preprocess.ranges import RangeTiles, range_tiles
from blocksparse_fsa.preprocess.triton.ranges import range_masks_triton


def steps(length, left, sinks, device, sync, out=None):
    """One build through ``analytic_layout``'s steps; yields (name, seconds). The layout lands
    in ``out[0]`` when ``out`` is a list."""
    t = time.perf_counter()

    def stamp(name):
        nonlocal t
        now = time.perf_counter()
        out = (name, now - t)
        t = now
        return out

    tiles = range_tiles([0, length], [0, length], left, 0, sinks, True, 64, 64)
    yield stamp("range_tiles (numba lists)")
    host = torch.from_numpy(tiles.buffer)
    if device.type == "cuda":
        host = host.pin_memory()
    yield stamp("pin_memory")
    packed = host.to(device, non_blocking=True)
    yield stamp("host-to-device copy (launch)")
    views = [packed[a:a + n.size] for a, n in zip(tiles.starts, tiles[:9])]
    yield stamp("views")
    masks = range_masks_triton(packed, tiles.part_qt.size, True, 64, 64)
    yield stamp("bit kernel (launch)")
    layout = SparseLayout(q_len=length, k_len=length, block_m=64, block_n=64, batch=1, heads=1,
                          is_causal=True, nnz=tiles.nnz, masks=masks,
                          **dict(zip(RangeTiles._fields[:9], views)))
    yield stamp("SparseLayout")
    sync()
    yield stamp("synchronize")
    if out is not None:
        out.append(layout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--window", type=int, default=1023, help="window_size[0]")
    ap.add_argument("--sinks", type=int, default=0)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        sync, name = torch.cuda.synchronize, torch.cuda.get_device_name()
    else:
        sync, name = (lambda: None), "cpu"
    window = (args.window, 0, args.sinks)
    built = []
    for _ in range(2):
        list(steps(args.seq_len, args.window, args.sinks, device, sync, built))
    per = {}
    for _ in range(args.runs):
        for step, sec in steps(args.seq_len, args.window, args.sinks, device, sync):
            per.setdefault(step, []).append(sec * 1e6)
    whole, host = [], []
    for _ in range(args.runs):
        window_mod.clear_cache()
        sync()
        t0 = time.perf_counter()
        layout = window_mod.window_layout(args.seq_len, args.seq_len, window, True, device)
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e6)
        whole.append((t2 - t0) * 1e6)
    same = all(torch.equal(getattr(built[0], f), getattr(layout, f))
               for f in RangeTiles._fields[:9] + ("masks",))
    print(f"{name}, torch {torch.__version__}; L={args.seq_len}, window ({args.window}, 0), "
          f"sinks {args.sinks}, 64x64 tiles; median of {args.runs}; {layout.num_tiles} tiles, "
          f"{'the same' if same else 'NOT the same'} as window_layout's")
    for step, us in per.items():
        print(f"  {step:32s} {statistics.median(us):8.1f} us")
    print(f"  {'sum of the steps':32s} {sum(statistics.median(u) for u in per.values()):8.1f} us")
    print(f"window_layout, fresh: host {statistics.median(host):.1f} us, synced "
          f"{statistics.median(whole):.1f} us (min {min(whole):.1f})")
    return same


if __name__ == "__main__":
    main()
