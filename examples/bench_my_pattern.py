"""Your own pattern in the benchmark, timed against FlexAttention and SDPA on your GPU::

    blocksparse-fsa-bench --pattern examples/bench_my_pattern.py:window_and_globals
    blocksparse-fsa-bench --seq-len 8192 32768 \
        --pattern examples/bench_my_pattern.py:window_and_globals_with_mask

The harness calls ``function(seq_len, heads_kv, device)`` once per length. It returns
``attn_indices`` ``(B|1, Hkv|1, L, W)`` (made causal, like the built-in patterns), a
``SparseLayout`` (used as it is), or either with a FlexAttention ``mask_mod`` as a pair (its
``h`` is the KV head; causality included). Without a mask_mod, flex gets the exact BlockMask
of the pattern. See ``blocksparse_fsa_bench.patterns.user_pattern``.
"""

import torch

WINDOW, GLOBALS = 512, 64


def window_and_globals(seq_len, heads_kv, device):
    """Keys i-511..i and the first 64 tokens, shared by every head: ``(1, 1, L, 576)``."""
    i = torch.arange(seq_len, device=device)[:, None]
    keys = torch.cat([i - torch.arange(WINDOW, device=device),
                      torch.arange(min(GLOBALS, seq_len), device=device).expand(seq_len, -1)],
                     dim=1)
    return torch.where(keys >= 0, keys, -1)[None, None]  # duplicates are fine


def window_and_globals_with_mask(seq_len, heads_kv, device):
    """The same, with the mask_mod a FlexAttention user would write for it."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((q_idx - kv_idx < WINDOW) | (kv_idx < GLOBALS))
    return window_and_globals(seq_len, heads_kv, device), mask_mod
