"""Context-parallel sparse attention across GPUs: time, bytes sent and scaling efficiency.

    torchrun --nproc-per-node 8 benchmarks/bench_context_parallel.py --out results_cp
    torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py --device cpu \\
        --seq-lens 512 --heads 4 2 --head-dim 16 --window 32 --block 32 --out /tmp/cp  # smoke

For each total length and pattern (a causal sliding window of ``--window`` keys; causal
document packing with documents of ``--doc-len`` tokens on average), one forward + backward of
``context_parallel_attn`` on the rank's shard is timed (median over ``--reps``, each rep the
slowest rank's), in three ways:

- ``halo``: the default, fetching only the key tiles each rank's queries touch;
- ``allgather``: the same call forced to all-gather K/V (``gather_threshold=0``);
- ``single``: ``sparse_attn_func`` on one GPU over the per-GPU length with the same pattern
  (no communication): ``efficiency = single / halo`` is the scaling efficiency;
- ``torch_cp``: PyTorch's ``context_parallel`` with dense causal SDPA (K/V heads expanded to
  the query heads; head-tail load balancing), the ring attention users run today, up to
  ``--torch-cp-max-len`` (it is quadratic) and over 3 reps.

Bytes are what the slowest-sending rank sent (forward K/V, backward dK/dV) next to an
all-gather's. The halo and all-gather outputs are compared before anything is timed. Rows go
to ``<out>/context_parallel_<world>ranks.csv`` and ``.md``, with the device and versions
(never over existing files, unless ``--overwrite``).
"""

import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import blocksparse_fsa
from blocksparse_fsa import patterns, sparse_attn_func
from blocksparse_fsa.distributed import CommStats, context_parallel_attn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FIELDS = ["pattern", "method", "world", "seq_len", "local_len", "ms", "efficiency",
          "fwd_bytes", "bwd_bytes", "allgather_bytes", "note"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[131072, 262144, 524288],
                    help="total sequence lengths (all ranks together)")
    ap.add_argument("--patterns", nargs="+", choices=["window", "documents"],
                    default=["window", "documents"])
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=1024, help="keys per query (causal)")
    ap.add_argument("--doc-len", type=int, default=8192, help="mean document length")
    ap.add_argument("--block", type=int, default=64, help="layout tile (block_m = block_n)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--torch-cp-max-len", type=int, default=262144,
                    help="run PyTorch's dense ring baseline up to this length (0: never); "
                         "it is quadratic")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--overwrite", action="store_true",
                    help="replace result files that already exist in --out")
    return ap.parse_args(argv)


def build(pattern, seq_len, args, device):
    """The layout of ``pattern`` over ``seq_len`` tokens (documents from a fixed seed, scaled
    to the length so that shorter runs see the same distribution)."""
    if pattern == "window":
        return patterns.sliding_window(seq_len, left=args.window - 1, is_causal=True,
                                       block_m=args.block, block_n=args.block, device=device)
    gen = torch.Generator().manual_seed(0)
    lengths, total = [], 0
    while total < seq_len:
        n = int(torch.randint(args.doc_len // 2, args.doc_len * 3 // 2 + 1, (1,),
                              generator=gen))
        lengths.append(min(n, seq_len - total))
        total += lengths[-1]
    cu = torch.tensor([0, *lengths]).cumsum(0)
    return patterns.document(cu, is_causal=True, block_m=args.block, block_n=args.block,
                             device=device)


def timed(fn, args, sync, device, reps=None):
    """Median over reps of the slowest rank's seconds for ``fn()``."""
    times = []
    reps = args.reps if reps is None else reps
    for i in range(args.warmup + reps):
        dist.barrier()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64,
                               device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= args.warmup:
            times.append(elapsed.item())
    return statistics.median(times)


def most(value, device):
    """The largest ``value`` over ranks."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def shards(local_len, args, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hq, hkv = args.heads
    return [torch.randn(1, local_len, h, args.head_dim, generator=gen).to(device, dtype)
            .requires_grad_() for h in (hq, hkv, hkv)]


def fwd_bwd(fn, q, k, v):
    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).sum().backward()
    return step


def torch_cp_step(seq_len, args, device, dtype, world, rank):
    """One forward + backward of PyTorch's context_parallel ring with dense causal SDPA."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    mesh = init_device_mesh(device.type, (world,))
    gen = torch.Generator().manual_seed(rank)
    hq = args.heads[0]
    q, k, v = (torch.randn(1, hq, seq_len, args.head_dim, generator=gen).to(device, dtype)
               for _ in range(3))

    def step():  # the context shards the buffers in place; the leaves below hold the grads
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            F.scaled_dot_product_attention(*leaves, is_causal=True).sum().backward()
    return step


def main(argv=None):
    args = parse_args(argv)
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        sync, name = torch.cuda.synchronize, torch.cuda.get_device_name(device)
    else:
        device, sync, name = torch.device("cpu"), (lambda: None), platform.processor() or "cpu"
    taken = [p for p in (result_stem(args, world).with_suffix(x) for x in (".csv", ".md"))
             if p.exists()]
    if taken and not args.overwrite:  # every rank sees the same files: all stop
        dist.destroy_process_group()
        raise SystemExit(f"{taken[0]} exists: pass another --out, or --overwrite")
    dtype = DTYPES[args.dtype]
    rows = []
    for seq_len in args.seq_lens:
        local_len = seq_len // world
        for pattern in args.patterns:
            layout = build(pattern, seq_len, args, device)
            q, k, v = shards(local_len, args, device, dtype, seed=rank)
            base = dict(pattern=pattern, world=world, seq_len=seq_len, local_len=local_len)
            outs, results = {}, {}
            for method, threshold in (("halo", 1.0), ("allgather", 0.0)):
                stats = CommStats()

                def cp(q, k, v, threshold=threshold, stats=stats):
                    return context_parallel_attn(q, k, v, layout=layout, stats=stats,
                                                 gather_threshold=threshold)
                outs[method] = cp(q, k, v).detach().float()
                probe = CommStats()  # one call's bytes
                cp(q, k, v, stats=probe).sum().backward()
                seconds = timed(fwd_bwd(cp, q, k, v), args, sync, device)
                results[method] = dict(base, method=method, ms=seconds * 1e3,
                                       fwd_bytes=most(probe.sent_fwd, device),
                                       bwd_bytes=most(probe.sent_bwd, device),
                                       allgather_bytes=most(probe.all_gather, device))
            err = (outs["halo"] - outs["allgather"]).abs().max().item()
            if err > 1e-2:
                raise SystemExit(f"{pattern} L={seq_len}: halo and all-gather outputs differ by "
                                 f"{err:.3e}; not timing")
            single_layout = build(pattern, local_len, args, device)
            seconds = timed(fwd_bwd(lambda q, k, v: sparse_attn_func(
                q, k, v, layout=single_layout), q, k, v), args, sync, device)
            results["single"] = dict(base, method="single", ms=seconds * 1e3,
                                     note="one device, local_len tokens, no communication")
            for method in ("halo", "allgather"):
                results[method]["efficiency"] = results["single"]["ms"] / results[method]["ms"]
            rows += results.values()
            del layout, q, k, v, outs
        if seq_len <= args.torch_cp_max_len:
            row = dict(pattern="dense-causal", method="torch_cp", world=world, seq_len=seq_len,
                       local_len=local_len)
            try:
                seconds = timed(torch_cp_step(seq_len, args, device, dtype, world, rank), args,
                                sync, device, reps=min(args.reps, 3))
                row.update(ms=seconds * 1e3, note="context_parallel + SDPA, K/V heads expanded")
            except Exception as exc:  # a backend or device the ring does not support
                row.update(note=f"unsupported here: {type(exc).__name__}: {exc}"[:200])
            rows.append(row)
    if rank == 0:
        write(rows, args, name, world)
    dist.destroy_process_group()


def result_stem(args, world):
    return args.out / f"context_parallel_{world}ranks"


def write(rows, args, name, world):
    args.out.mkdir(parents=True, exist_ok=True)
    versions = (f"{name}, {world} ranks, torch {torch.__version__}, blocksparse_fsa "
                f"{blocksparse_fsa.__version__}, Hq/Hkv {args.heads[0]}/{args.heads[1]}, "
                f"D {args.head_dim}, {args.dtype}, window {args.window}, doc_len "
                f"{args.doc_len}, block {args.block}")
    stem = result_stem(args, world)
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Context parallelism ({versions})", "",
             "| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    for row in rows:
        cells = [f"{row[f]:.3f}" if isinstance(row.get(f), float) else str(row.get(f, ""))
                 for f in FIELDS]
        lines.append("| " + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
