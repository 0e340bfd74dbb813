"""Same-run A/B of one decode step (``sparse_attn_with_kvcache``) between two checkouts.

Run once per checkout, in separate processes, on the same GPU and back to back::

    PYTHONPATH=/path/to/old python benchmarks/ab_decode.py --label before --out DIR
    PYTHONPATH=$PWD        python benchmarks/ab_decode.py --label after  --out DIR

or within one checkout, ``--config NAME=VALUE`` setting ``blocksparse_fsa.kernels.config.NAME``
first (``--config "DECODE_MERGE='ticket'"``).

Hq 32, Hkv 8, D 128, bf16, a full 32k cache per row, one query: a window of 1024 keys + 4 sinks
and 2048 random indices per (row, KV head), at each ``--batches``. Times ``do_bench`` medians of
the eager call (``check=False``) and of the call replayed from a CUDA graph, and, from
``torch.profiler``, the GPU time of each kernel of one graph replay (averaged over 20). Reports
the K/V bytes read per second as a fraction of a 1 GiB device-to-device copy measured in the
same process. Appends one JSON line per row to ``DIR/ab_decode.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from triton.testing import do_bench

from ab_kernels import set_config  # this script's folder is first on sys.path
from profile_kernels import kernel_times

HQ, HKV, D, LENGTH, WINDOW, SINKS, TOPK = 32, 8, 128, 32768, 1024, 4, 2048


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--config", nargs="*", default=[], metavar="NAME=VALUE",
                    help="set blocksparse_fsa.kernels.config.NAME to the literal VALUE")
    args = ap.parse_args(argv)

    import blocksparse_fsa as bsa

    set_config(args.config)

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    src = torch.randn((1 << 30) // 2, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 2 / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6
    del src, dst
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ab_decode.jsonl"), "a") as log:
        for batch in args.batches:
            k_cache = torch.randn(batch, LENGTH, HKV, D, device=dev, dtype=torch.bfloat16,
                                  generator=gen)
            v_cache = torch.randn_like(k_cache)
            q = torch.randn(batch, 1, HQ, D, device=dev, dtype=torch.bfloat16, generator=gen)
            lens = torch.full((batch,), LENGTH, dtype=torch.int32, device=dev)
            idx = torch.rand(batch, HKV, 1, LENGTH, device=dev, generator=gen).topk(
                TOPK).indices.int()
            for pattern, kw, keys in (
                    ("window", dict(window_size=(WINDOW - 1, 0), sinks=SINKS), WINDOW + SINKS),
                    ("topk", dict(attn_indices=idx), TOPK)):
                def eager(kw=kw):
                    return bsa.sparse_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens,
                                                        check=False, **kw)
                ref = eager()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    eager()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static = eager()
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(static, ref), "graph replay differs from eager"
                bytes_read = batch * HKV * keys * D * 2 * 2
                try:
                    kernels = kernel_times(graph.replay, calls=20)
                except Exception as e:  # noqa: BLE001 (the profiler is a bonus, not the A/B)
                    kernels = f"{type(e).__name__}: {e}"
                for mode, fn in (("eager", eager), ("graph", graph.replay)):
                    ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
                    row = dict(label=args.label, pattern=pattern, batch=batch, mode=mode, ms=ms,
                               of_copy=bytes_read / ms / 1e6 / copy_gbs, copy_gbs=copy_gbs,
                               kernels_us=kernels if mode == "graph" else None,
                               gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                               package=bsa.__file__, config=args.config,
                               time=time.strftime("%Y-%m-%dT%H:%M:%S"))
                    print(json.dumps(row), flush=True)
                    log.write(json.dumps(row) + "\n")
                del graph, static
            del k_cache, v_cache


if __name__ == "__main__":
    main()
