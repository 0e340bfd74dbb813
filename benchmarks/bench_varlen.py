"""Packed documents and FlashAttention-style windows: the varlen and window_size APIs against
the same patterns through other routes, side by side in one run.

    python benchmarks/bench_varlen.py --out /tmp/bench_varlen            # the GPU benchmark
    python benchmarks/bench_varlen.py --out /tmp/x --device cpu --total 256 --hq 4 --hkv 2 \\
        --dim 32 --dtype float32 --window 31 --backend torch            # CPU smoke run

Rows, all at ``--total`` tokens, causal, GQA ``--hq`` / ``--hkv``, head dim ``--dim``:

- ``documents``: 9 uneven documents (their lengths scaled to ``--total``) through
  ``sparse_attn_varlen_func`` (``varlen``: device ``cu_seqlens``, read back by every call;
  ``varlen_layout``: with ``layout=build_varlen_layout(...)`` built once, nothing read back),
  the same pattern as ``patterns.document`` +
  ``sparse_attn_func(layout=)`` (``document``), compiled FlexAttention with a document
  ``mask_mod`` (``flex``) and FlashAttention-4's ``flash_attn_varlen_func`` (``fa4``, skipped
  with a message when ``flash_attn.cute`` does not import).
- ``window``: ``window_size=(--window, 0)`` through ``sparse_attn_func`` (``window``), the same
  window as ``(1, 1, L, W)`` indices + ``build_layout`` (``indices``), flex with a sliding-window
  ``mask_mod`` (``flex``) and FA4's ``flash_attn_func(window_size=)`` (``fa4``).

Every system's output is compared with ours before it is timed (max abs difference against
``varlen`` / ``window``; a row over ``--tol`` times the largest output is reported and not
timed). Times are medians of
``triton.testing.do_bench`` on the GPU (of ``--reps`` synced calls on the CPU), forward and
forward+backward; TFLOP/s counts the pattern's non-zeros (4 nnz D Hq forward, 2.5x that for the
backward). ``build_first_ms`` is the first (uncached) layout or block-mask build of that row,
``build_fresh_ms`` the median of ``--fresh`` more uncached builds (the layout cache cleared
before each, outside the timing; each between two ``synchronize`` calls: host and device time
together, what a first call costs once compilers and allocators are warm), ``build_ms`` a
repeated one: for ``varlen`` / ``window`` the cached call the API makes on every later layer
(``varlen_layout``: the builder's own cache),
for ``document`` / ``indices`` / ``flex`` a rebuild (they have no cache).
Writes ``bench_varlen.csv`` and ``bench_varlen.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch

import blocksparse_fsa as bsa
from blocksparse_fsa.api import window as window_cache

# 9 uneven documents of a 32768-token pack (scaled for other totals)
DOC_LENGTHS = (8192, 1000, 5000, 123, 9000, 2345, 4096, 777, 2235)
FIELDS = ["row", "system", "total", "hq", "hkv", "dim", "dtype", "check_max_abs", "status",
          "build_first_ms", "build_fresh_ms", "build_ms", "fwd_ms", "fwdbwd_ms", "fwd_tflops",
          "fwdbwd_tflops", "device"]


def doc_lengths(total: int) -> list[int]:
    """:data:`DOC_LENGTHS` scaled to sum to ``total`` (each at least 1)."""
    scaled = [max(1, n * total // sum(DOC_LENGTHS)) for n in DOC_LENGTHS]
    scaled[-1] += total - sum(scaled)
    if scaled[-1] < 1:
        raise ValueError(f"--total {total} is too small for {len(DOC_LENGTHS)} documents")
    return scaled


def offsets(lengths, device) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)


def timer(device, reps):
    """``time(fn) -> ms``: do_bench's median on CUDA, a median of synced calls elsewhere."""
    if torch.device(device).type == "cuda":
        import triton.testing
        return lambda fn: triton.testing.do_bench(fn, return_mode="median")

    def time_cpu(fn):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return time_cpu


def once_ms(fn, device):
    """(result, ms) of one synced call."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return result, (time.perf_counter() - t0) * 1e3


def fresh_ms(build, cached, device, runs):
    """Median ms of ``runs`` synced builds, the layout cache cleared before each if ``cached``."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for _ in range(runs):
        if cached:
            window_cache.clear_cache()
        sync()
        t0 = time.perf_counter()
        build()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def flex_system(mask_mod, length, device):
    """(build, attend) for compiled FlexAttention on (1, H, L, D) tensors, GQA enabled."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)

    def build():
        try:  # compiled, as transformers' flex path builds it
            return create_block_mask(mask_mod, None, None, length, length, device=device,
                                     _compile=True)
        except TypeError:
            return create_block_mask(mask_mod, None, None, length, length, device=device)

    def attend(block_mask, q, k, v):
        out = compiled(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
                       block_mask=block_mask, enable_gqa=True)
        return out.transpose(1, 2)[0]
    return build, attend


def fa4_functions():
    """FlashAttention-4's (flash_attn_func, flash_attn_varlen_func), or a reason it is absent."""
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    except Exception as err:  # noqa: BLE001 - any import failure means "not on this machine"
        return None, f"flash_attn.cute does not import ({type(err).__name__}: {err})"
    return (flash_attn_func, flash_attn_varlen_func), None


def first(out):
    return out[0] if isinstance(out, tuple) else out


def document_systems(args, lengths, device):
    """name -> (build, attend(state, q, k, v) -> out) for the packed-documents row."""
    cu = offsets(lengths, device)
    longest = max(lengths)
    causal = True

    def build():
        return bsa.build_varlen_layout(cu, cu, is_causal=causal)

    systems = {
        "varlen": (build, lambda lay, q, k, v: bsa.sparse_attn_varlen_func(
                q, k, v, cu, cu, longest, longest, is_causal=causal, backend=args.backend)),
        # the layout built once per batch and passed to every call: device cu_seqlens are
        # then never read back (the call above reads them, one host sync per call)
        "varlen_layout": (build, lambda lay, q, k, v: bsa.sparse_attn_varlen_func(
                q, k, v, cu, cu, longest, longest, layout=lay, is_causal=causal,
                backend=args.backend)),
        "document": (lambda: bsa.patterns.document(cu, is_causal=causal, device=device),
                     lambda lay, q, k, v: bsa.sparse_attn_func(
                         q[None], k[None], v[None], layout=lay, backend=args.backend)[0]),
    }
    if "flex" in args.systems:
        doc = torch.searchsorted(cu[1:].long(), torch.arange(args.total, device=device),
                                 right=True)

        def document_mask(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
        systems["flex"] = flex_system(document_mask, args.total, device)
    fa4, why = fa4_functions() if "fa4" in args.systems else (None, None)
    if fa4 is not None:
        systems["fa4"] = (lambda: None, lambda _, q, k, v: first(fa4[1](
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
            max_seqlen_k=longest, causal=causal)))
    elif why:
        print(f"documents/fa4 skipped: {why}")
    return systems


def window_systems(args, device):
    """name -> (build, attend) for the window row."""
    left, length = args.window, args.total

    def window_build():  # the first call builds, every later call hits the cache
        return bsa.api.window.window_layout(length, length, (left, 0, 0), True, device)

    def indices():
        pos = torch.arange(length, device=device)
        idx = pos[:, None] - torch.arange(left + 1, device=device)[None, :]
        return bsa.build_layout(torch.where(idx >= 0, idx, -1).int()[None, None], length,
                                is_causal=True)

    systems = {
        "window": (window_build, lambda _, q, k, v: bsa.sparse_attn_func(
            q[None], k[None], v[None], is_causal=True, window_size=(left, 0),
            backend=args.backend)[0]),
        "indices": (indices, lambda lay, q, k, v: bsa.sparse_attn_func(
            q[None], k[None], v[None], layout=lay, backend=args.backend)[0]),
    }
    if "flex" in args.systems:
        def window_mask(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= left)
        systems["flex"] = flex_system(window_mask, length, device)
    fa4, why = fa4_functions() if "fa4" in args.systems else (None, None)
    if fa4 is not None:
        systems["fa4"] = (lambda: None, lambda _, q, k, v: first(fa4[0](
            q[None], k[None], v[None], causal=True, window_size=(left, 0)))[0])
    elif why:
        print(f"window/fa4 skipped: {why}")
    return systems


def run_row(row, systems, nnz, args, device, time_ms):
    """Check every system against the first, then time it; one result dict per system."""
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(args.total, h, args.dim, device=device, dtype=dtype, generator=gen)
               for h in (args.hq, args.hkv, args.hkv))
    dout = torch.randn_like(q)
    fwd_flops = 4.0 * nnz * args.dim * args.hq
    results, reference = [], None
    for name, (build, attend) in systems.items():
        result = dict(row=row, system=name, total=args.total, hq=args.hq, hkv=args.hkv,
                      dim=args.dim, dtype=args.dtype, device=device_name(device))
        try:
            cached = name in ("varlen", "varlen_layout", "window")
            if cached:
                window_cache.clear_cache()
            state, result["build_first_ms"] = once_ms(build, device)
            result["build_fresh_ms"] = fresh_ms(build, cached, device, args.fresh)
            result["build_ms"] = time_ms(build)
            out = attend(state, q, k, v)
        except Exception as err:  # noqa: BLE001 - a failing baseline is a row, not a crash
            result["status"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
            results.append(result)
            print(row, name, result["status"])
            continue
        if reference is None:
            reference = out.float()
        diff = (out.float() - reference).abs().max().item()
        result["check_max_abs"] = diff
        bound = args.tol * max(1.0, reference.abs().max().item())
        if not diff <= bound:
            result["status"] = f"mismatch: max abs {diff:.3g} > {bound:.3g} (--tol x max |out|)"
            results.append(result)
            print(row, name, result["status"])
            continue
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]

        def fwd(attend=attend, state=state):
            with torch.no_grad():
                return attend(state, q, k, v)

        def fwdbwd(ins=ins, attend=attend, state=state):
            attend(state, *ins).backward(dout)
            for t in ins:
                t.grad = None

        result["status"] = "ok"
        for key, fn, flops in (("fwd", fwd, fwd_flops), ("fwdbwd", fwdbwd, 3.5 * fwd_flops)):
            try:
                result[f"{key}_ms"] = time_ms(fn)
                result[f"{key}_tflops"] = flops / result[f"{key}_ms"] / 1e9
            except Exception as err:  # noqa: BLE001 - e.g. a baseline without a backward
                result["status"] = f"{key} failed: {type(err).__name__}: {str(err)[:200]}"
                break
        results.append(result)
        shown = ("build_first_ms", "build_fresh_ms", "build_ms", "fwd_ms", "fwdbwd_ms",
                 "check_max_abs")
        print(row, name, result["status"], {key: result.get(key) for key in shown})
    return results


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def write(results, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_varlen.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(results)
    cols = ["row", "system", "status", "build_first_ms", "build_fresh_ms", "build_ms", "fwd_ms",
            "fwdbwd_ms", "fwd_tflops", "fwdbwd_tflops", "check_max_abs"]
    import triton
    lines = [f"torch {torch.__version__}, triton {triton.__version__}, device "
             f"{results[0]['device'] if results else '-'}",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                 for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(out_dir, "bench_varlen.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for bench_varlen.csv / .md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--total", type=int, default=32768)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--window", type=int, default=1023, help="left window (window_size[0])")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--systems", default="flex,fa4",
                   help="baselines beside ours, comma-separated (flex, fa4; empty = none)")
    p.add_argument("--rows", default="documents,window")
    p.add_argument("--tol", type=float, default=None,
                   help="max abs difference to ours, relative to max |out| (default: 0.02 for "
                        "16-bit, 1e-4 for fp32)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per CPU measurement")
    p.add_argument("--fresh", type=int, default=11,
                   help="uncached builds behind build_fresh_ms (their median)")
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    if args.tol is None:
        args.tol = 1e-4 if args.dtype == "float32" else 0.02
    return args


def main(argv=None):
    args = parse(argv)
    device = torch.device(args.device)
    time_ms = timer(device, args.reps)
    results = []
    rows = args.rows.split(",")
    if "documents" in rows:
        lengths = doc_lengths(args.total)
        print("documents:", lengths)
        nnz = sum(n * (n + 1) // 2 for n in lengths)
        results += run_row("documents", document_systems(args, lengths, device), nnz, args,
                           device, time_ms)
    if "window" in rows:
        w = args.window + 1
        nnz = sum(min(i + 1, w) for i in range(args.total))
        results += run_row(f"window({args.window},0)", window_systems(args, device), nnz, args,
                           device, time_ms)
    write(results, args.out)
    return results


if __name__ == "__main__":
    main()
