"""Layout <-> indices, SciPy and FlexAttention, and the tile-map picture.

The references are the dense mask (``to_dense_mask``) and the dense softmax
(``reference.dense_attention``) on small sizes; layouts are compared tensor for tensor.
"""

import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import blocksparse_fsa as bsa
from blocksparse_fsa.layout import convert as interop
from blocksparse_fsa.layout import SparseLayout
from blocksparse_fsa.reference import dense_attention

from ..helpers import (CASES, HAS_CUDA, assert_rule, assert_same_layout, case_id,
                       random_case_indices, random_layout)


# (batch, heads, q_len, k_len, window, causal, block_m, block_n)


def mask_of_indices(idx, k_len):
    """Dense bool mask of padded indices (test helper, O(Lq * Lk))."""
    mask = torch.zeros(*idx.shape[:3], k_len + 1, dtype=torch.bool)
    mask.scatter_(-1, torch.where(idx >= 0, idx, k_len), True)
    return mask[..., :k_len]


# ---- to_indices --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_to_indices_round_trip(case):
    layout = random_layout(case, seed=sum(case[:5]))
    idx = layout.to_indices()
    counts = layout.to_dense_mask().sum(-1)
    assert idx.dtype == torch.int64 and idx.device == layout.device
    assert idx.shape == (layout.batch, layout.heads, layout.q_len, max(int(counts.max()), 1))
    # each row: its keys ascending, then -1 padding
    valid = idx >= 0
    assert torch.equal(valid.sum(-1), counts)
    assert torch.equal(valid, torch.arange(idx.shape[-1]) < counts[..., None])
    assert bool((idx[..., 1:] > idx[..., :-1])[valid[..., 1:]].all())
    assert torch.equal(mask_of_indices(idx, layout.k_len), layout.to_dense_mask())
    rebuilt = bsa.build_layout(idx, layout.k_len, block_m=layout.block_m, block_n=layout.block_n)
    assert_same_layout(rebuilt, layout)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_to_indices_dense_and_empty(causal):
    dense = SparseLayout.dense(70, 90, is_causal=causal, block_m=16, block_n=32)
    idx = dense.to_indices()
    assert idx.shape == (1, 1, 70, 90)
    assert_same_layout(bsa.build_layout(idx, 90, block_m=16, block_n=32), dense)
    empty = bsa.build_layout(torch.full((2, 1, 33, 4), -1), 50, block_m=16, block_n=16)
    idx = empty.to_indices()
    assert idx.shape == (2, 1, 33, 1) and bool((idx == -1).all())
    assert_same_layout(bsa.build_layout(idx, 50, block_m=16, block_n=16), empty)


@pytest.mark.parametrize("case", CASES[1:4], ids=case_id)
def test_layout_from_csr_inverts_layout_csr(case):
    layout = random_layout(case, seed=5)
    indptr, indices = interop.layout_csr(layout)
    assert indptr.shape == (layout.batch * layout.heads * layout.q_len + 1,)
    assert int(indptr[-1]) == indices.numel() == layout.nnz
    args = (layout.batch, layout.heads, layout.q_len, layout.k_len)
    blocks = dict(block_m=layout.block_m, block_n=layout.block_n)
    assert_same_layout(interop.layout_from_csr(indptr, indices, *args, **blocks), layout)
    # the rows in any order, causality applied again: same tiles
    rows = torch.repeat_interleave(torch.arange(indptr.numel() - 1), indptr.diff())
    shuffled = indices[torch.argsort(rows.double() + torch.rand(rows.numel()))]
    rebuilt = interop.layout_from_csr(indptr, shuffled, *args, is_causal=True, **blocks)
    want = bsa.build_layout(layout.to_indices(), layout.k_len, is_causal=True, **blocks)
    assert_same_layout(rebuilt, want)
    with pytest.raises(ValueError, match="indptr"):
        interop.layout_from_csr(indptr[:-1], indices, *args)
    with pytest.raises(ValueError, match="k_len"):
        interop.layout_from_csr(indptr, indices + layout.k_len, *args)


def test_layout_csr_small_chunks(monkeypatch):
    """Tiles walked a few at a time give the same CSR as all at once."""
    layout = random_layout(CASES[1], seed=3)
    want = interop.layout_csr(layout)
    monkeypatch.setattr(interop, "_CHUNK_PAIRS", 48)  # 1 full / 1 partial tile at a time
    got = interop.layout_csr(layout)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("chunk", [None, 300], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (64, 64), (16, 128), (32, 256)],
                         ids=lambda b: f"{b[0]}x{b[1]}")
def test_layout_csr_matches_dense_mask(blocks, chunk, monkeypatch):
    """``layout_csr`` against the dense mask's nonzeros: scattered keys (partial tiles, bit 31
    set in some words), a sliding window (full tiles), Lq not a multiple of block_m."""
    if chunk is not None:
        monkeypatch.setattr(interop, "_CHUNK_PAIRS", chunk)  # many chunks of partial tiles
    block_m, block_n = blocks
    idx = random_case_indices(2, 2, 150, 400, 40, seed=block_n, window_keys=3 * max(blocks))
    layout = bsa.build_layout(idx, 400, is_causal=True, block_m=block_m, block_n=block_n)
    assert layout.num_full_tiles and layout.num_partial_tiles
    assert block_n == 16 or bool((layout.masks < 0).any())  # bit 31 of a word
    indptr, indices = interop.layout_csr(layout)
    mask = layout.to_dense_mask().reshape(-1, layout.k_len)  # [batch * heads * q_len, k_len]
    want_ptr = torch.zeros(mask.shape[0] + 1, dtype=torch.long)
    torch.cumsum(mask.sum(1), 0, out=want_ptr[1:])
    assert indptr.dtype == indices.dtype == torch.int64
    assert torch.equal(indptr, want_ptr)
    assert torch.equal(indices, mask.nonzero()[:, 1])


# ---- SciPy -------------------------------------------------------------------------------------
def random_sparse(q_len, k_len, density, seed, fmt="csr"):
    rng = np.random.default_rng(seed)
    return sp.random_array((q_len, k_len), density=density, format=fmt, rng=rng,
                           data_sampler=lambda size: rng.integers(1, 5, size))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_scipy_round_trip(case):
    layout = random_layout(case, seed=7)
    mats = layout.to_scipy()
    assert len(mats) == layout.batch and all(len(row) == layout.heads for row in mats)
    dense = layout.to_dense_mask()
    for b in range(layout.batch):
        for h in range(layout.heads):
            m = mats[b][h]
            assert isinstance(m, sp.csr_array) and m.dtype == bool
            assert m.shape == (layout.q_len, layout.k_len) and m.nnz == int(dense[b, h].sum())
            assert m.has_canonical_format
            assert np.array_equal(m.toarray(), dense[b, h].numpy())
    back = SparseLayout.from_scipy(mats, block_m=layout.block_m, block_n=layout.block_n)
    assert_same_layout(back, layout)


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "lil", "dok"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_from_scipy_matches_dense_mask(fmt, causal):
    grid = [[random_sparse(99, 140, 0.05 + 0.1 * h, seed=10 * b + h, fmt=fmt) for h in range(3)]
            for b in range(2)]
    mask = torch.tensor(np.stack([[m.toarray() != 0 for m in row] for row in grid]))
    for bm, bn in ((16, 16), (16, 32), (64, 64)):
        got = SparseLayout.from_scipy(grid, is_causal=causal, block_m=bm, block_n=bn)
        want = SparseLayout.from_dense_mask(mask, is_causal=causal, block_m=bm, block_n=bn)
        assert_same_layout(got, want)
        assert got.is_causal == causal and got.device == torch.device("cpu")


def test_from_scipy_nonzero_semantics():
    """Duplicates add up, explicit zeros are dropped, NaN counts; the input is not modified."""
    rows = np.array([0, 0, 1, 1, 2, 3, 3])
    cols = np.array([5, 5, 3, 3, 7, 1, 2])
    vals = np.array([1.0, 2.0, 1.0, -1.0, 0.0, np.nan, 4.0])
    for m in (sp.coo_array((vals, (rows, cols)), shape=(33, 40)),
              sp.coo_matrix((vals, (rows, cols)), shape=(33, 40)).tocsr()):
        before = m.data.copy()
        layout = SparseLayout.from_scipy(m, block_m=16, block_n=16)
        assert layout.batch == layout.heads == 1 and layout.nnz == 3
        want = torch.zeros(1, 1, 33, 40, dtype=torch.bool)
        want[0, 0, 0, 5] = want[0, 0, 3, 1] = want[0, 0, 3, 2] = True
        assert torch.equal(layout.to_dense_mask(), want)
        assert np.array_equal(m.data, before, equal_nan=True)
    ones = sp.csr_array(np.ones((64, 64)))  # every pair: full tiles
    assert SparseLayout.from_scipy(ones, block_m=32, block_n=32).num_full_tiles == 4


def test_from_scipy_errors():
    m = random_sparse(20, 30, 0.1, seed=0)
    with pytest.raises(TypeError, match="scipy.sparse"):
        SparseLayout.from_scipy(m.toarray())
    with pytest.raises(TypeError, match="ambiguous"):
        SparseLayout.from_scipy([m, m])
    with pytest.raises(ValueError, match="same number of heads"):
        SparseLayout.from_scipy([[m, m], [m]])
    with pytest.raises(ValueError, match="one 2-D shape"):
        SparseLayout.from_scipy([[m, random_sparse(20, 31, 0.1, seed=0)]])
    with pytest.raises(ValueError, match="block_m"):
        SparseLayout.from_scipy(m, block_m=48)


# ---- FlexAttention -----------------------------------------------------------------------------
# (batch, layout heads, Lq, Lk, causal, block_m, block_n); q heads 4, kv heads 2
FLEX_CASES = [
    (2, 2, 77, 131, True, 16, 16),
    (1, 1, 130, 64, False, 16, 32),
    (2, 4, 96, 96, True, 32, 32),
    (1, 2, 128, 128, False, 32, 16),
    (1, 2, 100, 120, False, 64, 64),
]
HQ, HKV = 4, 2


def flex_case_id(case):
    b, h, lq, lk, causal, bm, bn = case
    return f"B{b}-Hl{h}-Lq{lq}-Lk{lk}-{bm}x{bn}" + ("-causal" if causal else "")


def flex_inputs(case, seed):
    b, h, lq, lk, causal, bm, bn = case
    idx = random_case_indices(b, h, lq, lk, 12, seed, window_keys=min(lk, 2 * max(bm, bn)))
    layout = bsa.build_layout(idx, lk, is_causal=causal, block_m=bm, block_n=bn)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, length, 16, generator=g)
               for n, length in ((HQ, lq), (HKV, lk), (HKV, lk)))  # flex layout (B, H, L, D)
    return layout, q, k, v


def expected_tiles(layout, num_q_heads):
    """Visited / full tile maps ``[B, H, QT, KT]`` of the dense mask, heads as the BlockMask."""
    bm, bn, qt, kt = layout.block_m, layout.block_n, layout.num_q_tiles, layout.num_k_tiles
    mask = layout.to_dense_mask()
    if layout.heads > 1:
        mask = mask.repeat_interleave(num_q_heads // layout.heads, dim=1)
    inside = torch.zeros(qt * bm, kt * bn, dtype=torch.bool)
    inside[:layout.q_len, :layout.k_len] = True
    padded = torch.zeros(*mask.shape[:2], qt * bm, kt * bn, dtype=torch.bool)
    padded[..., :layout.q_len, :layout.k_len] = mask
    tiles = padded.view(*mask.shape[:2], qt, bm, kt, bn)
    visited = tiles.any(5).any(3)
    full = (tiles | ~inside.view(qt, bm, kt, bn)).all(5).all(3)
    full &= inside.view(qt, bm, kt, bn).all(3).all(1)  # edge tiles are never full
    return visited, full


def listed_tiles(num, idx, n_cols):
    """Dense ``[..., rows, n_cols]`` map of the first ``num`` entries of each row of ``idx``."""
    keep = torch.arange(idx.shape[-1]) < num[..., None]
    dense = torch.zeros(*idx.shape[:-1], n_cols + 1, dtype=torch.bool)
    dense.scatter_(-1, torch.where(keep, idx.long(), n_cols), True)
    return dense[..., :n_cols]


@pytest.mark.parametrize("case", FLEX_CASES, ids=flex_case_id)
def test_flex_block_mask_matches_layout(case):
    """The mask_mod is exact everywhere, and the block lists hold the right tiles."""
    from torch.nn.attention.flex_attention import create_mask

    layout, *_ = flex_inputs(case, seed=1)
    bm = layout.to_flex_block_mask(num_q_heads=HQ)
    heads = HQ if layout.heads > 1 else 1
    assert bm.BLOCK_SIZE == (layout.block_m, layout.block_n)
    assert bm.shape == (layout.batch, heads, layout.q_len, layout.k_len)
    mask = layout.to_dense_mask().expand(-1, HQ if layout.heads == 1 else -1, -1, -1)
    if layout.heads > 1:
        mask = mask.repeat_interleave(HQ // layout.heads, dim=1)
    # flex passes the query head to mask_mod, and batches beyond the layout's wrap around
    batch = 2 if layout.batch == 1 else layout.batch
    got = create_mask(bm.mask_mod, batch, HQ, layout.q_len, layout.k_len, device="cpu")
    assert torch.equal(got, mask.expand(batch, -1, -1, -1))
    visited, full = expected_tiles(layout, HQ)
    n_kt = layout.num_k_tiles
    partial_listed = listed_tiles(bm.kv_num_blocks, bm.kv_indices, n_kt)
    full_listed = listed_tiles(bm.full_kv_num_blocks, bm.full_kv_indices, n_kt)
    assert torch.equal(full_listed, full)
    assert torch.equal(partial_listed, visited & ~full)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", FLEX_CASES, ids=flex_case_id)
def test_flex_attention_eager_matches_reference(case):
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    layout, q, k, v = flex_inputs(case, seed=2)
    out, aux = flex_attention(q, k, v, block_mask=layout.to_flex_block_mask(HQ), enable_gqa=True,
                              return_aux=AuxRequest(lse=True))
    t = (lambda x: x.transpose(1, 2).double())
    ref_out, ref_lse = dense_attention(t(q), t(k), t(v), layout.to_dense_mask())
    torch.testing.assert_close(out.transpose(1, 2).double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.lse.double(), ref_lse.double(), atol=1e-5, rtol=1e-5)


def test_flex_num_q_heads_errors():
    layout = bsa.build_layout(random_case_indices(1, 2, 32, 32, 4, 0), 32, block_m=16, block_n=16)
    with pytest.raises(ValueError, match="multiple"):
        layout.to_flex_block_mask(num_q_heads=3)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="compiled flex on the CPU needs a C++ compiler")
def test_flex_attention_compiled_cpu_uses_block_lists():
    """Inductor's CPU flex walks kv_indices / full_kv_indices (eager flex only uses mask_mod):
    dropping the full blocks must change the result, keeping them must match the reference."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    layout, q, k, v = flex_inputs((1, 2, 128, 128, True, 32, 32), seed=3)
    assert layout.num_full_tiles > 0
    block_mask = layout.to_flex_block_mask(HQ)
    flex = torch.compile(flex_attention, dynamic=False)
    out = flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    t = (lambda x: x.transpose(1, 2).double())
    ref, _ = dense_attention(t(q), t(k), t(v), layout.to_dense_mask())
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, atol=1e-5, rtol=1e-5)
    no_full = BlockMask.from_kv_blocks(block_mask.kv_num_blocks, block_mask.kv_indices,
                                       BLOCK_SIZE=block_mask.BLOCK_SIZE,
                                       mask_mod=block_mask.mask_mod,
                                       seq_lengths=block_mask.seq_lengths)
    wrong = flex(q, k, v, block_mask=no_full, enable_gqa=True)
    assert (wrong.transpose(1, 2).double() - ref).abs().max() > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_flex_compiled_gpu_matches_ours():
    """Compiled flex on the exported BlockMask vs our kernel, bf16, L=1024, GQA 8/2."""
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    length, hq, hkv, dim = 1024, 8, 2, 128
    i = torch.arange(length, device="cuda")[:, None]
    window = (i - torch.arange(200, device="cuda")).clamp(min=-1)
    scattered = torch.randint(-1, length, (1, hkv, length, 48), device="cuda")
    idx = torch.cat([window.expand(1, hkv, -1, -1), scattered], -1)
    q = torch.randn(1, length, hq, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, length, hkv, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, length, hkv, dim, device="cuda", dtype=torch.bfloat16)
    flex = torch.compile(flex_attention, dynamic=False)
    for causal in (True, False):
        layout = bsa.build_layout(idx, length, is_causal=causal)
        block_mask = layout.to_flex_block_mask(num_q_heads=hq)
        # flex's kernel tile must divide the BlockMask's (64x64 here)
        got = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                   block_mask=block_mask, enable_gqa=True,
                   kernel_options={"BLOCK_M": layout.block_m, "BLOCK_N": layout.block_n})
        ours = bsa.sparse_attn_func(q, k, v, layout=layout)
        ref, _ = dense_attention(q.float(), k.float(), v.float(), layout.to_dense_mask())
        assert_rule(f"flex-causal={causal}", got.transpose(1, 2), ours, ref, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_interop_on_cuda_layouts():
    """Every conversion runs on a CUDA layout and gives what it gives on the CPU."""
    cpu = random_layout(CASES[3], seed=11)
    gpu = cpu.to("cuda")
    idx = gpu.to_indices()
    assert idx.device.type == "cuda" and torch.equal(idx.cpu(), cpu.to_indices())
    assert_same_layout(bsa.build_layout(idx, gpu.k_len, block_m=gpu.block_m,
                                        block_n=gpu.block_n).to("cpu"), cpu)
    mats = gpu.to_scipy()
    back = SparseLayout.from_scipy(mats, block_m=gpu.block_m, block_n=gpu.block_n, device="cuda")
    assert back.device.type == "cuda"
    assert_same_layout(back.to("cpu"), cpu)
    block_mask = gpu.to_flex_block_mask(num_q_heads=2 * gpu.heads)
    assert block_mask.kv_indices.device.type == "cuda"


# ---- pictures ----------------------------------------------------------------------------------
def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    idx = random_case_indices(2, 2, 300, 260, 20, seed=5, window_keys=96)  # window: full tiles
    layout = bsa.build_layout(idx, 260, is_causal=True, block_m=32, block_n=32)
    path = tmp_path / "layout.png"
    fig = layout.plot(path, batch=1, head=1)
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert "300 x 260" in fig.axes[0].get_title()
    density, full = checked_density_map(layout, 1, 1)
    assert np.nanmax(density) <= 1.0 and bool(full.any())
    with pytest.raises(ValueError, match="head"):
        layout.plot(batch=0, head=2)


def test_plot_into_axes_and_large_map(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    dense = SparseLayout.dense(4096, 8192, is_causal=True, block_m=16, block_n=16)
    assert dense.plot(ax=ax) is fig  # 256 x 512 tiles, one imshow
    assert len(ax.images) == 1
    fig.savefig(tmp_path / "dense.png")
    assert (tmp_path / "dense.png").stat().st_size > 1000


def checked_density_map(layout, batch, head):
    """viz's per-tile density map, checked against tile sums of the dense mask."""
    from blocksparse_fsa.layout.viz import tile_density_map

    density, full = tile_density_map(layout, batch, head)
    dense = layout.to_dense_mask()[batch, head].float()
    qt, kt = layout.num_q_tiles, layout.num_k_tiles
    padded = torch.zeros(qt * layout.block_m, kt * layout.block_n)
    padded[:layout.q_len, :layout.k_len] = dense
    sums = padded.view(qt, layout.block_m, kt, layout.block_n).sum((1, 3)).numpy()
    np.testing.assert_allclose(np.nan_to_num(density) * layout.block_m * layout.block_n, sums)
    return density, full
