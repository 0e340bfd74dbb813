"""Per-kernel GPU times of ours on benchmark patterns, with TMA loads on and off (GPU only).

    python benchmarks/profile_kernels.py --pattern sliding_window dilated_reordered --seq-len 32768

For each pattern and load path (``pointer``: ``config.TMA = False``; ``tma``: TMA in token
order only; ``tma3d``: also the 3-D descriptors of the computed dilation order) prints the
forward and forward+backward medians (``triton.testing.do_bench``), the largest difference of
out, dq, dk, dv from the first path run, and each kernel's time from ``torch.profiler``.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import blocksparse_fsa as bsa
from blocksparse_fsa_bench import patterns as bench_patterns
from blocksparse_fsa.kernels import config

PATHS = {"pointer": dict(TMA=False, TMA_DILATION=False),
         "tma": dict(TMA=True, TMA_DILATION=False),
         "tma3d": dict(TMA=True, TMA_DILATION=True)}


def kernel_times(step, calls: int = 10) -> dict:
    """Mean device time (us) per ``step()`` of each CUDA kernel it runs."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    times = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            times[event.name[:40]] = times.get(event.name[:40], 0.0) + event.device_time / calls
    return {name: round(us) for name, us in sorted(times.items(), key=lambda kv: -kv[1])}


def timed(fn, device) -> float:
    """Median ms of ``fn`` (``do_bench`` on CUDA; one wall-clock run on the CPU)."""
    if device == "cuda":
        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", nargs="+", default=["sliding_window", "dilated_reordered"],
                        choices=bench_patterns.PATTERNS)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--heads-q", type=int, default=32)
    parser.add_argument("--heads-kv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    # "cpu": a smoke test under TRITON_INTERPRET=1 (fp32; the interpreter emulates TMA)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    length, hq, hkv, dim, device = (args.seq_len, args.heads_q, args.heads_kv, args.head_dim,
                                    args.device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, length, h, dim, device=device, dtype=dtype, requires_grad=True)
               for h in (hq, hkv, hkv))
    dout = torch.randn_like(q)
    saved = {name: getattr(config, name) for name in PATHS["pointer"]}
    for name in args.pattern:
        pattern = bench_patterns.PATTERN_BUILDERS[name](length, hkv, device)
        layout = bsa.build_layout(pattern.indices, length, is_causal=True,
                                  reorder=pattern.reorder, kernel="tiles")

        def fwd():
            return bsa.sparse_attn_func(q, k, v, layout=layout)

        def fwd_bwd():
            return torch.autograd.grad(fwd(), (q, k, v), dout)

        first = None
        for path in args.paths:
            if (path == "tma3d") != bool(layout.perm_dilation) and path != "pointer":
                continue  # in the computed dilation order tma is pointer, elsewhere tma3d is tma
            for key, value in PATHS[path].items():
                setattr(config, key, value)
            got = (fwd(), *fwd_bwd())
            first = first or got
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, first))
            ms, ms_both = (timed(fn, device) for fn in (fwd, fwd_bwd))
            print(f"{name:18s} {path:8s} fwd {ms:.3f} ms  fwd+bwd {ms_both:.3f} ms  "
                  f"max diff vs {args.paths[0]} {diff:.1e}", flush=True)
            if device == "cuda":
                print(f"  kernels (us): {kernel_times(fwd_bwd)}", flush=True)
        for key, value in saved.items():
            setattr(config, key, value)


if __name__ == "__main__":
    main()
