"""Shared test helpers: the tiers, the tolerance rule, index and layout generators, brute-force
oracles. Test modules import from here, never from each other."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import blocksparse_fsa as bsa
from blocksparse_fsa.layout import unpack_bits

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# the kernel tiers: CUDA tensors on a GPU, CPU tensors under the interpreter
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
needs_kernels = pytest.mark.skipif(not (INTERPRET or HAS_CUDA),
                                   reason="needs TRITON_INTERPRET=1 or a GPU")
# the atol of the tolerance rule (assert_rule) per dtype
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
REPO = Path(__file__).resolve().parents[1]


def assert_rule(name, ours, lowp, ref, atol):
    """FlashAttention's rule: |ours - ref| <= 2 * |lowp - ref| + atol (max over elements), where
    ``lowp`` is the same math in PyTorch at the inputs' precision and ``ref`` a higher-precision
    reference. On failure, say where the worst element is and how far off it is."""
    ours, lowp, ref = ours.double(), lowp.double(), ref.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(ours), finite), (
        f"{name}: non-finite values differ: ours has {(~torch.isfinite(ours)).sum()} "
        f"(NaN {ours.isnan().sum()}), reference {(~finite).sum()}; first mismatch at "
        f"{(torch.isfinite(ours) != finite).nonzero()[0].tolist()}")
    assert torch.equal(ours[~finite], ref[~finite]), f"{name}: infinities differ"
    err = (ours - ref).abs().where(finite, 0.0)
    base = (lowp - ref).abs().where(finite, 0.0).max().item()
    bound = 2 * base + atol
    worst = err.max().item()
    if worst > bound:
        where = tuple(torch.nonzero(err == err.max())[0].tolist())
        raise AssertionError(
            f"{name}: max error {worst:.3e} > bound {bound:.3e} (2 * {base:.3e} + {atol:g}) at "
            f"index {where}: ours {ours[where].item():.6g}, reference {ref[where].item():.6g}; "
            f"{(err > bound).sum().item()} of {err.numel()} elements over the bound")


# ---- layouts -----------------------------------------------------------------------------------
LAYOUT_TENSORS = ["full_ptr", "full_col", "part_ptr", "part_col", "masks", "full_ptr_t",
                  "full_row_t", "part_ptr_t", "part_row_t", "part_mask_t"]


def brute_force_mask(idx, q_len, k_len, is_causal):
    """The pattern by definition: a Python loop over every index."""
    n_b, n_h, _, _ = idx.shape
    mask = np.zeros((n_b, n_h, q_len, k_len), dtype=bool)
    for b, h, i, w in np.ndindex(*idx.shape):
        j = int(idx[b, h, i, w])
        if j >= 0 and (not is_causal or j <= i + k_len - q_len):
            mask[b, h, i, j] = True
    return torch.from_numpy(mask)


def random_indices(shape, k_len, seed, p_empty=0.2):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, max(k_len, 1), shape, generator=g)
    idx[torch.rand(shape, generator=g) < p_empty] = -1
    return idx


def window_indices(q_len, window, shuffle_seed=None, dup=False):
    """Sliding window i-window+1..i (clipped to -1), optionally shuffled and duplicated."""
    i = torch.arange(q_len)[:, None]
    idx = i - torch.arange(window)[None, :]
    idx = torch.where(idx >= 0, idx, -1)
    if dup:
        idx = torch.cat([idx, idx], dim=1)
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        idx = idx[:, torch.randperm(idx.shape[1], generator=g)]
    return idx[None, None]


def check_layout_invariants(layout):
    """CSR pointers monotone, key tiles sorted within a row, transposed CSR a permutation."""
    for ptr, col in ((layout.full_ptr, layout.full_col), (layout.part_ptr, layout.part_col)):
        assert (ptr[1:] >= ptr[:-1]).all()
        for r in range(ptr.numel() - 1):
            row = col[ptr[r]:ptr[r + 1]]
            assert (row[1:] > row[:-1]).all(), "key tiles of a row must be sorted and unique"
    check_transposed_lists(layout)
    bits = unpack_bits(layout.masks, layout.block_n)
    assert bits.flatten(1).any(1).all(), "a stored partial tile must have an active pair"
    assert not bits.flatten(1).all(1).any() or layout.q_len % layout.block_m \
        or layout.k_len % layout.block_n, "an in-range tile with every bit set must be full"


def check_transposed_lists(layout):
    """The key-tile lists hold exactly the query-tile lists' tiles, query tiles ascending per
    key tile, and ``part_mask_t`` points at the same tile in the query-tile lists."""
    n_qt, n_kt = layout.num_q_tiles, layout.num_k_tiles
    for ptr, col, ptr_t, row_t, mask_t in (
            (layout.full_ptr, layout.full_col, layout.full_ptr_t, layout.full_row_t, None),
            (layout.part_ptr, layout.part_col, layout.part_ptr_t, layout.part_row_t,
             layout.part_mask_t)):
        position = {}  # (group, q tile, key tile) -> index in col
        for r in range(ptr.numel() - 1):
            for e in range(int(ptr[r]), int(ptr[r + 1])):
                position[(r // n_qt, r % n_qt, int(col[e]))] = e
        assert ptr_t.numel() == layout.batch * layout.heads * n_kt + 1 and int(ptr_t[0]) == 0
        seen = {}
        for c in range(ptr_t.numel() - 1):
            rows = row_t[ptr_t[c]:ptr_t[c + 1]].tolist()
            assert rows == sorted(set(rows)), "query tiles of a key tile: sorted, unique"
            for t, qt in enumerate(rows, int(ptr_t[c])):
                seen[(c // n_kt, qt, c % n_kt)] = t
        assert seen.keys() == position.keys()
        if mask_t is not None:
            assert all(int(mask_t[t]) == position[k] for k, t in seen.items())


# (batch, heads, q_len, k_len, window, causal, block_m, block_n)
CASES = [
    (1, 1, 64, 64, 64, False, 16, 16),
    (2, 3, 77, 131, 20, True, 16, 16),
    (1, 2, 130, 64, 40, False, 16, 32),
    (2, 2, 111, 111, 30, True, 16, 32),
    (2, 1, 200, 300, 150, True, 64, 64),
    (1, 3, 150, 97, 9, False, 64, 64),
]


def case_id(case):
    b, h, lq, lk, w, causal, bm, bn = case
    return f"B{b}-H{h}-Lq{lq}-Lk{lk}-W{w}-{bm}x{bn}" + ("-causal" if causal else "")


def random_case_indices(batch, heads, q_len, k_len, window, seed, window_keys=0):
    """Random keys (with -1 slots and duplicates), plus a sliding window so full tiles occur."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, k_len, (batch, heads, q_len, window), generator=g)
    if window_keys:
        i = torch.arange(q_len)[:, None] + (k_len - q_len)
        win = (i - torch.arange(window_keys)).clamp(-1, k_len - 1)
        idx = torch.cat([idx, win.expand(batch, heads, -1, -1)], -1)
    return idx


def random_layout(case, seed=0):
    b, h, lq, lk, w, causal, bm, bn = case
    idx = random_case_indices(b, h, lq, lk, w, seed, window_keys=min(lk, 2 * max(bm, bn)))
    return bsa.build_layout(idx, lk, is_causal=causal, block_m=bm, block_n=bn)


def assert_same_layout(got, want):
    for attr in ("q_len", "k_len", "block_m", "block_n", "batch", "heads", "nnz"):
        assert getattr(got, attr) == getattr(want, attr), attr
    for name in LAYOUT_TENSORS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (
            f"{name} differs: {a.shape} vs {b.shape}")


# ---- the benchmark's patterns -------------------------------------------------------------------
BENCH_L, BENCH_HKV = 256, 2
EXAMPLE = REPO / "examples" / "bench_my_pattern.py"
USER_MODULE = """
import torch

import blocksparse_fsa as bsa


def random_layout(seq_len, heads_kv, device):  # per head, not causal
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(-1, seq_len, (1, heads_kv, seq_len, 6), generator=gen)
    return bsa.build_layout(idx, seq_len).to(device)


def batched(seq_len, heads_kv, device):  # (2, 1, L, 3): a different pattern per batch entry
    i = torch.arange(seq_len)[:, None]
    idx = torch.stack([i - torch.arange(3), i - 2 * torch.arange(3)])[:, None]
    return idx.clamp(min=-1).to(device)


def float_indices(seq_len, heads_kv, device):
    return torch.zeros(1, 1, seq_len, 4)


def three_heads(seq_len, heads_kv, device):
    return torch.zeros(1, 3, seq_len, 4, dtype=torch.long)


def short(seq_len, heads_kv, device):
    return torch.zeros(1, 1, seq_len - 1, 4, dtype=torch.long)


def wrong_layout_length(seq_len, heads_kv, device):
    return bsa.build_layout(torch.zeros(1, 1, seq_len + 1, 1, dtype=torch.long), seq_len + 1)


def a_string(seq_len, heads_kv, device):
    return "sliding_window"


def a_triple(seq_len, heads_kv, device):
    return torch.zeros(1, 1, seq_len, 4, dtype=torch.long), None, None


NOT_CALLABLE = 3
"""


def row_sets(pattern, head=0):
    """Causal index set of every query row of ``pattern`` (head ``head``)."""
    idx = pattern.indices[0, head].tolist()
    return [{j for j in row if 0 <= j <= i} for i, row in enumerate(idx)]


def brute_mask(pattern):
    """[Hkv, L, L] bool from the index sets."""
    out = torch.zeros(pattern.num_kv_heads, pattern.seq_len, pattern.seq_len, dtype=torch.bool)
    for h in range(pattern.num_kv_heads):
        for i, keys in enumerate(row_sets(pattern, h)):
            out[h, i, sorted(keys)] = True
    return out


def small_patterns():
    """The benchmark's patterns at test size (``L``, ``HKV``)."""
    from blocksparse_fsa_bench import patterns as bp  # on sys.path via tests/benchmarks

    return [bp.sliding_window(BENCH_L, BENCH_HKV, "cpu", window=40),
            bp.dilated(BENCH_L, BENCH_HKV, "cpu", num_keys=20, stride=4),
            bp.bigbird(BENCH_L, BENCH_HKV, "cpu", block=16),
            bp.nsa_blocks(BENCH_L, BENCH_HKV, "cpu", block=16, num_selected=5),
            bp.topk_random(BENCH_L, BENCH_HKV, "cpu", k=24)]
