"""Shared by the examples: run forward + backward on a layout and compare with the reference,
and draw the tile maps."""

import math
import sys

import torch

import blocksparse_fsa as bsa
from blocksparse_fsa.reference import dense_attention


def run_and_check(layout, q_heads=4, kv_heads=2, dim=64, seed=0):
    """Attention on ``layout`` (GPU if present, else CPU) vs the fp32 dense reference.

    Prints the relative errors of out, dq, dk, dv and the layout's statistics.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layout = layout.to(device)
    torch.manual_seed(seed)
    shape_q = (1, layout.q_len, q_heads, dim)
    shape_kv = (1, layout.k_len, kv_heads, dim)
    q = torch.randn(shape_q, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(shape_kv, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(shape_kv, device=device, dtype=dtype, requires_grad=True)
    out = bsa.sparse_attn_func(q, k, v, layout=layout)
    out.float().square().mean().backward()

    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, _ = dense_attention(qr, kr, vr, layout.to_dense_mask(), 1 / math.sqrt(dim))
    ref.square().mean().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for name, ours, theirs in [("out", out, ref), ("dq", q.grad, qr.grad),
                               ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)]:
        rel = ((ours.float() - theirs).norm() / theirs.norm()).item()
        print(f"  {name:>3}: relative error vs reference {rel:.2e}")
        assert rel < tol, name
    print(f"  {layout}")


def draw(**layouts):
    """If the example got a folder argument, write ``<folder>/<name>.png`` for each layout."""
    if len(sys.argv) > 1:
        for name, layout in layouts.items():
            path = f"{sys.argv[1]}/{name}.png"
            layout.plot(path)
            print(f"  tile map written to {path}")
