"""Context parallelism: a causal sliding window with the sequence sharded across processes.

    torchrun --nproc-per-node 2 examples/context_parallel.py

Runs on CPUs (gloo) or one GPU per process (NCCL). Each rank holds a contiguous shard of q, k
and v, fetches only the key tiles its window reaches from the rank before it, and checks its
rows of the output and its gradients against the single-device call.
"""

import os

import torch
import torch.distributed as dist

from blocksparse_fsa import patterns, sparse_attn_func
from blocksparse_fsa.distributed import CommStats, context_parallel_attn, shard

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
if cuda:
    torch.cuda.set_device(device)

seq_len, heads, kv_heads, dim = 256 * world, 4, 2, 32
layout = patterns.sliding_window(seq_len, left=63, is_causal=True, block_m=32, block_n=32,
                                 device=device)  # the whole sequence, built once on every rank
gen = torch.Generator().manual_seed(0)  # every rank makes the same whole inputs
q, k, v = (torch.randn(1, seq_len, h, dim, generator=gen).to(device)
           for h in (heads, kv_heads, kv_heads))

# this rank's shard, as a context-parallel model holds it
q_s, k_s, v_s = (shard(t, world, rank).requires_grad_() for t in (q, k, v))
stats = CommStats()
out = context_parallel_attn(q_s, k_s, v_s, layout=layout, stats=stats)
out.sum().backward()

# the single-device call on the whole sequence, for this rank's rows and keys
q, k, v = (t.requires_grad_() for t in (q, k, v))
ref = sparse_attn_func(q, k, v, layout=layout)
ref.sum().backward()
errors = [(a - shard(b, world, rank)).abs().max().item()
          for a, b in ((out, ref), (q_s.grad, q.grad), (k_s.grad, k.grad), (v_s.grad, v.grad))]
assert max(errors) < 1e-4, errors
print(f"rank {rank}: sent {stats.sent_fwd} bytes of K/V (an all-gather: {stats.all_gather}), "
      f"max error {max(errors):.1e}: matches the single-device call")
dist.destroy_process_group()
