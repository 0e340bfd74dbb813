"""Same-run A/B of the attention kernels of two checkouts of the package.

Run once per checkout, in separate processes, on the same GPU and back to back::

    PYTHONPATH=/path/to/old python benchmarks/ab_kernels.py --label before --out DIR
    PYTHONPATH=$PWD        python benchmarks/ab_kernels.py --label after  --out DIR

It times ``sparse_attn_func(q, k, v, layout=...)`` forward and forward+backward
(``triton.testing.do_bench`` medians) on the benchmark's headline shapes (B1 Hq32 Hkv8 D128
bf16, L=32768) for a causal sliding window of 1024 keys and a causal BigBird layout, using
only API that every released version of the package has, and appends one JSON line per row to
``DIR/ab_kernels.jsonl``. ``--config NAME=VALUE`` sets ``blocksparse_fsa.kernels.config.NAME``
first (a Python literal), to compare launch options of one checkout the same way.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import time

import torch
import triton
from triton.testing import do_bench


def set_config(items) -> None:
    """``NAME=VALUE`` items: set ``blocksparse_fsa.kernels.config.NAME`` to the literal VALUE."""
    for item in items:
        from blocksparse_fsa.kernels import config

        name, _, value = item.partition("=")
        if not hasattr(config, name):
            raise SystemExit(f"blocksparse_fsa.kernels.config has no {name!r}")
        setattr(config, name, ast.literal_eval(value))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--out", default=".")
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3, help="do_bench runs per row")
    parser.add_argument("--config", nargs="*", default=[], metavar="NAME=VALUE",
                        help="set blocksparse_fsa.kernels.config.NAME to the literal VALUE")
    args = parser.parse_args(argv)

    import blocksparse_fsa as bsa

    set_config(args.config)

    L, hq, hkv, d, dev = args.seq_len, 32, 8, 128, "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(h):
        return torch.randn(1, L, h, d, device=dev, generator=gen).to(torch.bfloat16)

    q, k, v, dout = randn(hq), randn(hkv), randn(hkv), randn(hq)
    for t in (q, k, v):
        t.requires_grad_(True)
    layouts = {
        "sliding_window": bsa.patterns.sliding_window(L, left=1023, is_causal=True, device=dev),
        "bigbird": bsa.patterns.bigbird(L, block_size=64, heads=hkv, is_causal=True, device=dev),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ab_kernels.jsonl"), "a") as log:
        for name, layout in layouts.items():
            def fwd():
                return bsa.sparse_attn_func(q, k, v, layout=layout)

            def fwdbwd():
                fwd().backward(dout)

            flops = 4.0 * layout.nnz / (layout.batch * layout.heads) * d * hq
            fwdbwd()
            for pass_name, fn, factor in (("fwd", fwd, 1.0), ("fwdbwd", fwdbwd, 3.5)):
                times = [do_bench(fn, warmup=25, rep=200, grad_to_none=[q, k, v],
                                  return_mode="median") for _ in range(args.repeats)]
                ms = sorted(times)[len(times) // 2]
                row = dict(label=args.label, pattern=name, seq_len=L, pass_name=pass_name,
                           ms=ms, ms_runs=times, tflops=factor * flops / ms / 1e9,
                           gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, package=bsa.__file__,
                           config=args.config,
                           time=time.strftime("%Y-%m-%dT%H:%M:%S"))
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
