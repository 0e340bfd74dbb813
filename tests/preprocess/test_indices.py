"""The numba preprocessor and the dense-mask path against a brute-force pattern."""

import numpy as np
import pytest
import torch

from blocksparse_fsa import SparseLayout, build_layout
from blocksparse_fsa.layout import unpack_bits
from blocksparse_fsa.preprocess import causal_mask

BLOCKS = [(16, 16), (16, 32), (32, 16), (64, 64), (16, 128), (128, 32)]
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


@pytest.mark.parametrize("block_m,block_n", BLOCKS, ids=lambda x: str(x))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 3, 77, 91, 9), (1, 1, 64, 64, 70), (1, 2, 100, 40, 5),
                                   (2, 1, 33, 130, 1)],
                         ids=lambda s: "B{}-H{}-Lq{}-Lk{}-W{}".format(*s))
def test_random_indices_match_brute_force(shape, is_causal, block_m, block_n):
    n_b, n_h, q_len, k_len, window = shape
    idx = random_indices((n_b, n_h, q_len, window), k_len, seed=q_len * window)
    layout = build_layout(idx, k_len, is_causal=is_causal, block_m=block_m, block_n=block_n)
    expected = brute_force_mask(idx.numpy(), q_len, k_len, is_causal)
    assert torch.equal(layout.to_dense_mask(), expected)
    assert layout.nnz == int(expected.sum())
    assert (layout.batch, layout.heads, layout.q_len, layout.k_len) == (n_b, n_h, q_len, k_len)
    check_layout_invariants(layout)
    # the dense-mask path and the PyTorch (GPU-side) build give the identical layout
    from_mask = SparseLayout.from_dense_mask(expected, block_m=block_m, block_n=block_n)
    in_torch = build_layout(idx, k_len, is_causal=is_causal, block_m=block_m, block_n=block_n,
                            method="torch")
    assert in_torch.nnz == layout.nnz
    for name in LAYOUT_TENSORS:
        assert torch.equal(getattr(layout, name), getattr(from_mask, name)), name
        assert torch.equal(getattr(layout, name), getattr(in_torch, name)), name


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 64)], ids=str)
def test_window_has_full_tiles_and_ignores_order_and_duplicates(block_m, block_n):
    plain = build_layout(window_indices(200, 100), 200, block_m=block_m, block_n=block_n)
    messy = build_layout(window_indices(200, 100, shuffle_seed=1, dup=True), 200,
                         block_m=block_m, block_n=block_n)
    assert plain.num_full_tiles > 0
    for name in LAYOUT_TENSORS:
        assert torch.equal(getattr(plain, name), getattr(messy, name)), name
    expected = brute_force_mask(window_indices(200, 100).numpy(), 200, 200, False)
    assert torch.equal(messy.to_dense_mask(), expected)
    check_layout_invariants(plain)


@pytest.mark.parametrize("q_len,k_len", [(50, 50), (37, 70), (70, 37), (1, 33), (64, 128)])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_dense_layout_matches_mask(q_len, k_len, is_causal):
    layout = SparseLayout.dense(q_len, k_len, is_causal=is_causal, block_m=16, block_n=32)
    expected = causal_mask(q_len, k_len, "cpu") if is_causal else torch.ones(q_len, k_len,
                                                                              dtype=torch.bool)
    assert torch.equal(layout.to_dense_mask()[0, 0], expected)
    assert layout.nnz == int(expected.sum())
    from_mask = SparseLayout.from_dense_mask(expected[None, None], block_m=16, block_n=32)
    for name in LAYOUT_TENSORS:
        assert torch.equal(getattr(layout, name), getattr(from_mask, name)), name


def test_causal_drops_future_keys_bottom_right():
    # Lq=4, Lk=6: query i sees keys j <= i + 2
    idx = torch.arange(6).expand(1, 1, 4, 6)
    layout = build_layout(idx, 6, is_causal=True, block_m=16, block_n=16)
    assert torch.equal(layout.to_dense_mask()[0, 0], causal_mask(4, 6, "cpu"))
    assert layout.to_dense_mask()[0, 0].sum(1).tolist() == [3, 4, 5, 6]


@pytest.mark.parametrize("method", ["numba", "torch", "triton"])
def test_all_inactive_and_empty_shapes(method):
    idx = torch.full((1, 2, 40, 3), -1)
    layout = build_layout(idx, 50, block_m=16, block_n=16, method=method)
    assert layout.num_tiles == 0 and layout.nnz == 0 and layout.density == 1.0
    assert not layout.to_dense_mask().any()
    layout = build_layout(torch.zeros(1, 1, 0, 4, dtype=torch.int64), 10, method=method)
    assert layout.num_tiles == 0 and layout.to_dense_mask().shape == (1, 1, 0, 10)


def test_torch_build_in_small_chunks_and_bad_method():
    from blocksparse_fsa.preprocess.torch import indices_to_tiles_torch
    from blocksparse_fsa.preprocess.numba import indices_to_tiles

    idx = random_indices((2, 2, 70, 6), 90, seed=3)
    a = indices_to_tiles(idx.numpy(), 70, 90, True, 16, 32)
    b = indices_to_tiles_torch(idx, 70, 90, True, 16, 32, chunk_pairs=50)  # one row a chunk
    for x, y in zip(a[:4], b[:4]):  # pointers and key tiles
        assert torch.equal(torch.from_numpy(x).long(), y.long())
    assert torch.equal(torch.from_numpy(a[4]).view(torch.int32), b[4])  # bitmasks
    assert a[5] == b[5]  # nnz
    with pytest.raises(ValueError, match="method must be"):
        build_layout(idx, 90, method="cuda")


def test_preprocessing_is_linear_in_indices_not_quadratic():
    # 1 key per query at L = 2**17: a dense mask would be 16 GiB; this must stay small and fast
    q_len = 2**17
    idx = torch.arange(q_len)[None, None, :, None]
    layout = build_layout(idx, q_len, is_causal=True, block_m=64, block_n=64, kernel="tiles")
    assert layout.nnz == q_len
    assert layout.num_tiles == q_len // 64
    assert layout.nbytes < 4 * 2**20
