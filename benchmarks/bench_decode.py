"""One decode step against a KV cache: sparse_attn_with_kvcache vs FlexAttention and SDPA (GPU).

    python benchmarks/bench_decode.py --out DIR          # the full grid, about 3-4 min on an H100
    python benchmarks/bench_decode.py --out DIR --lengths 8192 --batches 1 8

Hq 32, Hkv 8, D 128, bf16; cache lengths 8k / 32k / 128k, batch 1 / 8 / 64; every row's cache
is full and one query per row attends. Patterns: a window of 1024 keys + 4 sinks
(``window_size=(1023, 0), sinks=4``) and 2048 indices per (row, KV head) (a top-k selector's
output, unsorted, unique). Rows:

- ``ours``: the split-KV kernel on the cache stored (B, Hkv, L, D) as HF keeps it, read through
  its (B, L, Hkv, D) view, without the data checks (``check=False``); ``ours-checked``: the
  same eager call with the default ``check=None``, whose data checks read values back to the
  host (one sync per call); ``ours-paged``: a copy in 256-token pages through a block table
  (where it fits in 4 GiB); ``ours-graph``: ``ours`` captured in a CUDA graph and replayed
  (the kernel time without Python's launch cost); ``ours-graph-32-layers``: 32 such calls in
  one graph, as the attention of a 32-layer model's step, per call (one replay's launch cost
  shared by the layers, as in serving), each layer reading other K/V than the last (the window
  at other cache lengths, top-k indices shifted) so that none finds its keys in L2.
- ``flex``: ``torch.compile(flex_attention)`` on the same pattern (its decoding path at one
  query), the BlockMask built outside the timing.
- ``sdpa-dense``: SDPA over the whole cache (what the pattern saves), checked against
  ``sparse_attn_with_kvcache`` without a pattern.
- ``fa-kvcache``: FlashAttention's ``flash_attn_with_kvcache`` (from ``flash_attn.cute``, else
  ``flash_attn``; FlashAttention-4, which has none, through ``flash_attn_varlen_func`` with
  ``seqused_k``) on the window without sinks (it has none), checked against ours likewise;
  skipped with a message when neither installs.

Every candidate is checked against ours before it is timed (a mismatch is reported, not timed).
Times are ``triton.testing.do_bench`` medians. ``GB/s`` counts the K/V bytes the pattern reads
(keys x Hkv x D x 2 tensors x 2 bytes per row); ``of copy`` divides it by the bandwidth of a
1 GiB device-to-device copy measured in the same run. Chunked prefill (128, 512 and 2048 new
queries against 32k, window + sinks) compares this kernel with the tile walker on the analytic
window layout, both through ``sparse_attn_with_kvcache``. ``--sweep`` adds ``ours`` under a
grid of launch configs (``BLOCK_N``, warps, stages, split waves) to tune
``kernels.decode.get_decode_config`` / ``SPLIT_WAVES``; ``--config NAME=VALUE`` sets
``blocksparse_fsa.kernels.config.NAME`` first (``--config "DECODE_MERGE='ticket'"``). Writes
``bench_decode_<gpu>.csv`` and ``.md`` to ``--out``.
"""

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

from blocksparse_fsa import sparse_attn_with_kvcache
from blocksparse_fsa.kernels import decode

HQ, HKV, D, WINDOW, SINKS, TOPK, PAGE = 32, 8, 128, 1024, 4, 2048, 256
LAYERS = 32


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--patterns", nargs="+", choices=["window", "topk"],
                    default=["window", "topk"])
    ap.add_argument("--sweep", nargs="?", const="full", choices=["full", "quick"],
                    help="also time ours (graph-captured) over a grid of launch configs; "
                         "'quick': split waves x BLOCK_N x stages at 4 warps")
    ap.add_argument("--config", nargs="*", default=[], metavar="NAME=VALUE",
                    help="set blocksparse_fsa.kernels.config.NAME to the literal VALUE first "
                         "(--config \"DECODE_MERGE='ticket'\")")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # CPU, tiny shapes
    return ap.parse_args(argv)


def timer(smoke):
    if smoke:
        def run(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return run
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def copy_bandwidth(bench, device):
    """GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    n = (1 << 30) // 2 if device.type == "cuda" else 1 << 20
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / ms / 1e6


def agree(a, b):
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() <= 2e-2 * max(1.0, b.abs().max().item())


def pattern_keys(name, batch, length, device, gen):
    """(allowed (B, Hkv, L) bool, attn_indices or None, keys read per (row, KV head))."""
    allowed = torch.zeros(batch, HKV, length, dtype=torch.bool, device=device)
    if name == "window":
        allowed[..., max(0, length - WINDOW):] = True
        allowed[..., :SINKS] = True
        return allowed, None, int(allowed[0, 0].sum())
    top = min(TOPK, length)
    idx = torch.rand(batch, HKV, 1, length, device=device, generator=gen).topk(top).indices
    allowed.scatter_(2, idx[:, :, 0], True)
    return allowed, idx.int(), top


_FLEX_MASKS = {}


def flex(q, k, v, allowed, compiled):
    """FlexAttention on the pattern (a per-key table); its BlockMask is built on the first call
    of a (pattern, shape), outside the timing of the later ones. ``k``, ``v``: (B, Hkv, L, D)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    key = id(allowed)
    if key not in _FLEX_MASKS or _FLEX_MASKS[key][0] is not allowed:
        batch, length = allowed.shape[0], allowed.shape[2]
        group = HQ // HKV

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed[b, h // group, kv_idx]

        _FLEX_MASKS.clear()
        _FLEX_MASKS[key] = (allowed, create_block_mask(mask_mod, batch, HQ, 1, length,
                                                       device=q.device))
    fn = compiled if compiled is not None else flex_attention
    return fn(q.transpose(1, 2), k, v, block_mask=_FLEX_MASKS[key][1],
              enable_gqa=True).transpose(1, 2)


def fa_kvcache():
    """``flash_attn_with_kvcache`` from FlashAttention 4 (``flash_attn.cute``) or 2/3, or a
    reason why not."""
    for module in ("flash_attn.cute", "flash_attn.cute.interface", "flash_attn"):
        try:
            mod = __import__(module, fromlist=["flash_attn_with_kvcache"])
        except Exception as e:  # noqa: BLE001 (an import can fail in many ways)
            last = f"{module}: {type(e).__name__}: {e}"
            continue
        fn = getattr(mod, "flash_attn_with_kvcache", None)
        if fn is not None:
            return fn, module
        varlen = getattr(mod, "flash_attn_varlen_func", None)
        if module.startswith("flash_attn.cute") and varlen is not None:
            # FlashAttention-4 decodes through its varlen entry point: a batched q, whole
            # caches and each row's length as seqused_k
            def fn(q, k_cache, v_cache, *, cache_seqlens, causal, window_size, varlen=varlen):
                return varlen(q, k_cache, v_cache, seqused_k=cache_seqlens, causal=causal,
                              window_size=window_size)[0]
            return fn, f"{module}.flash_attn_varlen_func(seqused_k=)"
        last = f"{module} has no flash_attn_with_kvcache"
    return None, last


def main(argv=None):
    args = parse_args(argv)
    if args.config:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from ab_kernels import set_config
        set_config(args.config)
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        global HQ, HKV, D, WINDOW, SINKS, TOPK, PAGE
        HQ, HKV, D, WINDOW, SINKS, TOPK, PAGE = 4, 2, 32, 64, 4, 48, 32
    bench = timer(args.smoke)
    torch._dynamo.config.cache_size_limit = 64  # one flex compile per shape
    compiled = None
    if not args.smoke:
        from torch.nn.attention.flex_attention import flex_attention
        compiled = torch.compile(flex_attention, dynamic=False)
    fa, fa_where = fa_kvcache()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    copy_gbs = copy_bandwidth(bench, device)
    print(f"{gpu}, torch {torch.__version__}; copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    if fa is None:
        print(f"fa-kvcache skipped: {fa_where}", flush=True)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    start = time.time()

    def add(pattern, batch, length, method, fn, keys, ref, note="", calls=1):
        """Check ``fn`` against ``ref``, then time it; ``calls``: decode steps per call."""
        kv_bytes = batch * HKV * keys * D * 2 * 2
        row = dict(pattern=pattern, batch=batch, cache_len=length, method=method, keys=keys)
        try:
            out = fn()
            if ref is not None and not agree(out, ref):
                row.update(ms="", note=f"CHECK FAILED vs ours {note}".strip())
            else:
                ms = bench(fn) / calls
                gbs = kv_bytes / ms / 1e6
                row.update(ms=f"{ms:.4f}", gbs=f"{gbs:.0f}", of_copy=f"{gbs / copy_gbs:.2f}",
                           note=note)
        except torch.OutOfMemoryError:
            row.update(ms="", note="skipped: out of memory")
        except Exception as e:  # noqa: BLE001 (a baseline's failure must not end the run)
            row.update(ms="", note=f"failed: {type(e).__name__}: {str(e)[:120]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    prefill(rows, bench, device, dtype, gen, copy_gbs)  # first: the shortest rows to lose
    for length in args.lengths:
        for batch in args.batches:
            try:  # stored (B, Hkv, L, D) like HF's caches (what flex and SDPA read); ours
                # and FlashAttention read the (B, L, Hkv, D) view of it
                k_store = torch.randn(batch, HKV, length, D, device=device, dtype=dtype,
                                      generator=gen)
                v_store = torch.randn_like(k_store)
            except torch.OutOfMemoryError:
                print(f"L={length} B={batch}: the cache does not fit, skipped", flush=True)
                continue
            k_cache, v_cache = k_store.transpose(1, 2), v_store.transpose(1, 2)
            q = torch.randn(batch, 1, HQ, D, device=device, dtype=dtype, generator=gen)
            lens = torch.full((batch,), length, dtype=torch.int32, device=device)
            paged = None  # a copy in 256-token pages, where two more caches fit easily
            if k_store.numel() * k_store.element_size() <= 4 << 30:
                paged = [c.reshape(batch * length // PAGE, PAGE, HKV, D)
                         for c in (k_cache, v_cache)]
                paged.append(torch.arange(batch * length // PAGE, device=device,
                                          dtype=torch.int32).view(batch, -1))
            for pattern in args.patterns:
                allowed, idx, keys = pattern_keys(pattern, batch, length, device, gen)
                kw = dict(attn_indices=idx) if idx is not None else dict(
                    window_size=(WINDOW - 1, 0), sinks=SINKS)

                def ours(kc=k_cache, vc=v_cache, bt=None, kw=kw, check=False):
                    return sparse_attn_with_kvcache(q, kc, vc, cache_seqlens=lens,
                                                    block_table=bt, check=check, **kw)
                ref = ours()
                add(pattern, batch, length, "ours", ours, keys, None)
                add(pattern, batch, length, "ours-checked", lambda: ours(check=None), keys, ref)
                if paged is not None:
                    add(pattern, batch, length, "ours-paged", lambda: ours(*paged), keys, ref)
                if device.type == "cuda":
                    add(pattern, batch, length, "ours-graph", capture([ours], device), keys,
                        ref)
                layers = layer_calls(q, k_cache, v_cache, lens, idx, kw, length)
                add(pattern, batch, length, f"ours-graph-{LAYERS}-layers",
                    capture(layers, device), keys, ref, calls=LAYERS)
                if args.sweep:
                    sweep(add, pattern, batch, length, ours, keys, ref, device,
                          SWEEP[args.sweep])
                add(pattern, batch, length, "flex", lambda: flex(q, k_store, v_store, allowed,
                                                                 compiled), keys, ref)
                del allowed
            dense = sparse_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens,
                                             check=False)
            add("dense", batch, length, "sdpa-dense", lambda: torch.nn.functional.
                scaled_dot_product_attention(q.transpose(1, 2), k_store, v_store,
                                             enable_gqa=True)
                .transpose(1, 2), length, dense)
            if fa is not None:
                no_sinks = sparse_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens,
                                                    window_size=(WINDOW - 1, 0), check=False)
                add("window (no sinks)", batch, length, "fa-kvcache", lambda: fa(
                    q, k_cache, v_cache, cache_seqlens=lens, causal=True,
                    window_size=(WINDOW - 1, 0)), min(WINDOW, length), no_sinks,
                    note=fa_where)
            del k_store, v_store, k_cache, v_cache, paged
            print(f"-- L={length} B={batch} done at {time.time() - start:.0f} s", flush=True)
            write(args.out, gpu, copy_gbs, rows, quiet=True)  # what a time limit leaves

    write(args.out, gpu, copy_gbs, rows)


def layer_calls(q, k_cache, v_cache, lens, idx, kw, length):
    """``LAYERS`` decode calls like one step of a model's layers: the same shapes and bytes,
    other keys per call (the window at ``length``, ``length - WINDOW``, ... cycling over the
    disjoint windows that fit, top-k indices shifted by a prime stride modulo ``length``: still
    unique). The first call is the benchmark's own."""
    regions = max(1, (length - SINKS) // WINDOW)
    calls = []
    for layer in range(LAYERS):
        if idx is None:
            seqlens = lens - WINDOW * (layer % regions)
            layer_kw = kw
        else:
            seqlens = lens
            layer_kw = dict(attn_indices=(idx + 7919 * layer) % length)
        calls.append(lambda s=seqlens, lk=layer_kw: sparse_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=s, check=False, **lk))
    return calls


def capture(calls, device):
    """A function running ``calls`` (from one CUDA graph where there is a GPU) that returns the
    first call's output."""
    if device.type != "cuda":
        return lambda: [call() for call in calls][0]
    for call in calls:
        call()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]
    return lambda: (graph.replay(), outs[0])[1]


SWEEP = dict(
    full=[dict(BLOCK_N=n, num_warps=w, num_stages=st, waves=wv) for n in (32, 64, 128)
          for w in (4, 8) for st in (2, 3, 4) for wv in (1, 2, 4)
          if not (n == 128 and w == 4)],
    quick=[dict(BLOCK_N=n, num_warps=4, num_stages=st, waves=wv) for n in (32, 64)
           for st in (2, 3) for wv in (2, 4, 8)])


def sweep(add, pattern, batch, length, ours, keys, ref, device, grid):
    """``ours`` under each launch config of ``grid`` (``get_decode_config`` and ``SPLIT_WAVES``
    overridden), graph-captured where there is a GPU."""
    default_config, default_waves = decode.get_decode_config, decode.SPLIT_WAVES
    try:
        for cfg in grid:
            cfg = dict(cfg)
            decode.SPLIT_WAVES = cfg.pop("waves")
            decode.get_decode_config = lambda head_dim, indices, cfg=cfg: dict(cfg)
            add(pattern, batch, length, "sweep " + " ".join(
                f"{k}={v}" for k, v in cfg.items()) + f" waves={decode.SPLIT_WAVES}",
                capture([ours], device), keys, ref)
    finally:
        decode.get_decode_config, decode.SPLIT_WAVES = default_config, default_waves


def prefill(rows, bench, device, dtype, gen, copy_gbs):
    """Chunked prefill: 128 / 512 / 2048 new queries (already appended) against 32k keys,
    window + sinks, through the split kernel and through the tile walker (the analytic layout)
    forced by ``config.PREFILL_TILES_MIN_QUERIES``, and through the default choice."""
    from blocksparse_fsa.kernels import config

    length, chunks = (32768, (128, 512, 2048)) if device.type == "cuda" else (512, (16, 64))
    k = torch.randn(1, length, HKV, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn_like(k)
    kw = dict(window_size=(WINDOW - 1, 0), sinks=SINKS)
    default = config.PREFILL_TILES_MIN_QUERIES
    for new in chunks:
        q = torch.randn(1, new, HQ, D, device=device, dtype=dtype, generator=gen)

        def call(threshold, q=q):
            config.PREFILL_TILES_MIN_QUERIES = threshold
            try:
                return sparse_attn_with_kvcache(q, k, v, cache_seqlens=length, check=False,
                                                **kw)
            finally:
                config.PREFILL_TILES_MIN_QUERIES = default
        ref = call(2**62)
        for method, threshold in (("ours (kvcache, split kernel)", 2**62),
                                  ("ours (kvcache, tile walker)", 1),
                                  (f"ours (kvcache, default: walker from {default} queries)",
                                   default)):
            out = call(threshold)
            ok = agree(out, ref)
            ms = bench(lambda: call(threshold)) if ok else float("nan")
            tflops = 4 * new * (WINDOW + SINKS) * D * HQ / ms / 1e9 if ok else float("nan")
            row = dict(pattern=f"prefill {new} new", batch=1, cache_len=length, method=method,
                       keys=WINDOW + SINKS, ms=f"{ms:.4f}",
                       note=f"{tflops:.0f} TFLOP/s" if ok else "CHECK FAILED vs the split kernel")
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def write(out_dir, gpu, copy_gbs, rows, quiet=False):
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_decode_" + "".join(c if c.isalnum() else "_" for c in gpu)
    fields = ["pattern", "batch", "cache_len", "method", "keys", "ms", "gbs", "of_copy", "note"]
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    import triton
    lines = [f"# One decode step, Hq {HQ}, Hkv {HKV}, D {D}", "",
             f"{gpu}, torch {torch.__version__}, triton {triton.__version__}; device copy "
             f"bandwidth {copy_gbs:.0f} GB/s. `GB/s`: K/V bytes the pattern reads per ms.", "",
             "| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in fields) + " |" for r in rows]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print(f"wrote {out_dir / stem}.csv/.md")


if __name__ == "__main__":
    sys.exit(main())
