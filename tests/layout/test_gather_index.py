"""``build_gather_index`` against the layout's dense mask, and ``gather_stats``."""

import pytest
import torch

import blocksparse_fsa as bsa
from blocksparse_fsa import patterns
from blocksparse_fsa.layout.gather_index import GatherIndex, build_gather_index, gather_stats
from blocksparse_fsa.layout import SparseLayout

from ..helpers import CASES, case_id, random_layout


def dense_of_csr(ptr, entries, n_groups, n_rows, n_cols):
    """``[n_groups, n_rows, n_cols]`` bool of a CSR over the flat rows ``g * n_rows + r``."""
    rows = torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr.diff())
    dense = torch.zeros(n_groups * n_rows, n_cols, dtype=torch.bool)
    dense[rows, entries.long()] = True
    return dense.view(n_groups, n_rows, n_cols)


def check_index(gidx: GatherIndex, layout: SparseLayout):
    """Both CSRs hold exactly the layout's pairs, each row ascending without repeats."""
    n_groups = layout.batch * layout.heads
    assert (gidx.q_len, gidx.k_len, gidx.batch, gidx.heads, gidx.is_causal) == (
        layout.q_len, layout.k_len, layout.batch, layout.heads, layout.is_causal)
    assert gidx.nnz == layout.nnz == gidx.row_t.numel()
    assert gidx.row_ptr.dtype == gidx.row_ptr_t.dtype == torch.int64
    assert gidx.col.dtype == gidx.row_t.dtype == torch.int32
    assert gidx.row_ptr.shape == (n_groups * layout.q_len + 1,)
    assert gidx.row_ptr_t.shape == (n_groups * layout.k_len + 1,)
    assert int(gidx.row_ptr[-1]) == int(gidx.row_ptr_t[-1]) == gidx.nnz
    mask = layout.unordered().to_dense_mask().reshape(n_groups, layout.q_len, layout.k_len)
    assert torch.equal(dense_of_csr(gidx.row_ptr, gidx.col, n_groups, layout.q_len,
                                    layout.k_len), mask)
    assert torch.equal(dense_of_csr(gidx.row_ptr_t, gidx.row_t, n_groups, layout.k_len,
                                    layout.q_len), mask.transpose(1, 2))
    for ptr, entries in ((gidx.row_ptr, gidx.col), (gidx.row_ptr_t, gidx.row_t)):
        rows = torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr.diff())
        same_row = rows[1:] == rows[:-1]
        assert bool((entries[1:] > entries[:-1])[same_row].all()), "rows must be ascending"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gather_index_matches_layout(case):
    layout = random_layout(case, seed=7)
    check_index(build_gather_index(layout), layout)


@pytest.mark.parametrize("layout", [
    SparseLayout.dense(33, 47, is_causal=True, block_m=16, block_n=16),
    SparseLayout.dense(40, 20, is_causal=True, block_m=16, block_n=16),  # 20 empty rows
    bsa.build_layout(torch.full((2, 1, 9, 3), -1), 12),  # nothing at all
    patterns.sliding_window(50, left=6, global_tokens=2, is_causal=True, block_m=16,
                            block_n=32),
    patterns.dilated_window(64, size=5, dilation=3, is_causal=True, block_m=16, block_n=16),
], ids=["dense-causal", "dense-Lq>Lk", "empty", "longformer", "dilated"])
def test_gather_index_of_other_layouts(layout):
    check_index(build_gather_index(layout), layout)


def test_gather_index_of_a_reordered_layout_is_in_kernel_order():
    idx = torch.randint(-1, 40, (1, 2, 40, 6), generator=torch.Generator().manual_seed(2))
    layout = bsa.build_layout(idx, 40, is_causal=True, block_m=16, block_n=16,
                              reorder=("dilation", 4))
    gidx = build_gather_index(layout)
    check_index(gidx, layout)
    plain = build_gather_index(layout.unordered())
    assert all(torch.equal(getattr(gidx, f), getattr(plain, f))
               for f in ("row_ptr", "col", "row_ptr_t", "row_t"))


def test_gather_index_to_device_and_repr():
    layout = random_layout(CASES[1], seed=1)
    gidx = build_gather_index(layout)
    assert gidx.to("cpu") is gidx and gidx.device == layout.device
    assert gidx.nbytes == 8 * (gidx.row_ptr.numel() + gidx.row_ptr_t.numel()) + 8 * gidx.nnz
    assert f"nnz={gidx.nnz}" in repr(gidx)
    with pytest.raises(TypeError, match="SparseLayout"):
        build_gather_index(gidx)


def test_gather_stats():
    # query i attends keys i-2..i (3 keys, 2 and 1 at the start), causal, one group
    layout = patterns.sliding_window(40, left=2, is_causal=True, block_m=16, block_n=16)
    stats = gather_stats(layout, block_n=2, block_q=4)
    assert stats["nnz"] == layout.nnz == 3 * 40 - 3
    assert stats["tiles"] == layout.num_tiles and stats["tile_density"] == layout.density
    assert stats["tile_pairs"] == layout.num_tiles * 16 * 16
    assert stats["gather_slots_fwd"] == 2 + 2 + 38 * 4  # 1, 2, then 3 keys in chunks of 2
    assert stats["gather_slots_dkdv"] == 40 * 4  # 3 queries per key (1, 2 at the end)
    assert stats["keys_per_query_max"] == 3 and stats["queries_per_key_max"] == 3
    assert stats["empty_queries"] == 0
    assert stats["gather_density_fwd"] == pytest.approx(117 / 156)
