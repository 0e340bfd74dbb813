"""Quickstart: a Longformer-style pattern (sliding window + global tokens), forward and backward,
checked against the reference. Runs on a GPU if there is one, else on the CPU."""

import math
import os
import time

import torch

import blocksparse_fsa as bsa
from blocksparse_fsa.reference import dense_attention

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
batch, length, q_heads, kv_heads, dim = 1, 2048 if device == "cuda" else 512, 8, 2, 64
window, n_global = 128, 4

# attn_indices (B|1, Hkv|1, Lq, W): the window i-127..i, then the first 4 tokens; -1 = unused.
i = torch.arange(length)[:, None]
local = i - torch.arange(window)[None, :]
global_ = torch.arange(n_global).expand(length, -1)
idx = torch.cat([local, global_], dim=1)
idx = torch.where(idx >= 0, idx, -1)[None, None].to(device)  # duplicates are fine

# Once per batch, reused by every layer. On the GPU two Triton kernels build it; CPU indices
# this small build with PyTorch, large ones with numba (which compiles once per machine, in
# 10-60 s, and logs a line saying so).
start = time.perf_counter()
layout = bsa.build_layout(idx, k_len=length, is_causal=True)
build_ms = (time.perf_counter() - start) * 1e3

torch.manual_seed(0)
q = torch.randn(batch, length, q_heads, dim, device=device, dtype=dtype, requires_grad=True)
k = torch.randn(batch, length, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
v = torch.randn(batch, length, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
out, lse = bsa.sparse_attn_func(q, k, v, layout=layout, return_lse=True)
out.float().square().mean().backward()

# the same through the dense reference (fp32, a dense mask: only sensible at small sizes)
qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
ref, _ = dense_attention(qr, kr, vr, layout.to_dense_mask(), 1 / math.sqrt(dim))
ref.square().mean().backward()
for name, ours, theirs in [("out", out, ref), ("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad),
                           ("dv", v.grad, vr.grad)]:
    rel = ((ours.float() - theirs).norm() / theirs.norm()).item()
    print(f"{name:>3}: relative error vs reference {rel:.2e}")
    assert rel < (2e-2 if dtype == torch.bfloat16 else 1e-4), name

dense_mask_bytes = layout.batch * layout.heads * length * length  # one byte per bool
backend = ("Triton kernels" if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
           else "pure-PyTorch path (TRITON_INTERPRET=1 runs the Triton kernels on the CPU)")
print(f"device {device}, {dtype}, L={length}, Hq={q_heads}, Hkv={kv_heads}, D={dim}: {backend}")
print(f"layout: {layout.num_tiles} tiles ({layout.num_full_tiles} full), density "
      f"{layout.density:.2f}, {layout.nbytes / 1024:.0f} KiB, built in {build_ms:.0f} ms")
print(f"vs a dense bool mask: {dense_mask_bytes / 1024:.0f} KiB; the indices: "
      f"{idx.numel() * idx.element_size() / 1024:.0f} KiB")
