"""The numba preprocessor and the dense-mask path against a brute-force pattern."""

import pytest
import torch

from blocksparse_fsa import SparseLayout, build_layout
from blocksparse_fsa.preprocess import causal_mask

from ..helpers import (LAYOUT_TENSORS, brute_force_mask, check_layout_invariants, random_indices,
                       window_indices)

BLOCKS = [(16, 16), (16, 32), (32, 16), (64, 64), (16, 128), (128, 32)]


@pytest.mark.parametrize("block_m,block_n", BLOCKS, ids=lambda x: str(x))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 3, 77, 91, 9), (1, 1, 64, 64, 70), (1, 2, 100, 40, 5),
                                   (2, 1, 33, 130, 1)],
                         ids=lambda s: "B{}-H{}-Lq{}-Lk{}-W{}".format(*s))
def test_random_indices_match_brute_force(shape, is_causal, block_m, block_n):
    n_b, n_h, q_len, k_len, window = shape
    idx = random_indices((n_b, n_h, q_len, window), k_len, seed=q_len * window)
    layout = build_layout(idx, k_len, is_causal=is_causal, block_m=block_m, block_n=block_n,
                          method="numba")
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
    plain = build_layout(window_indices(200, 100), 200, block_m=block_m, block_n=block_n,
                         method="numba")
    messy = build_layout(window_indices(200, 100, shuffle_seed=1, dup=True), 200,
                         block_m=block_m, block_n=block_n, method="numba")
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
    for method in ("numba", "torch"):
        layout = build_layout(idx, 6, is_causal=True, block_m=16, block_n=16, method=method)
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
    layout = build_layout(idx, q_len, is_causal=True, block_m=64, block_n=64, kernel="tiles",
                          method="numba")
    assert layout.nnz == q_len
    assert layout.num_tiles == q_len // 64
    assert layout.nbytes < 4 * 2**20


def test_auto_method_takes_numba_for_large_cpu_indices(monkeypatch):
    """``method="auto"`` on the CPU: PyTorch for small index tensors until numba is loaded,
    numba from ``NUMBA_MIN_INDICES`` on; both give the same layout."""
    import sys

    from blocksparse_fsa.layout import build

    idx = random_indices((1, 2, 50, 4), 60, seed=1)
    monkeypatch.delitem(sys.modules, "blocksparse_fsa.preprocess.numba", raising=False)
    assert build._auto_method(idx) == "torch"
    monkeypatch.setattr(build, "NUMBA_MIN_INDICES", idx.numel())
    assert build._auto_method(idx) == "numba"
    want = build_layout(idx, 60, method="torch")
    got = build_layout(idx, 60)
    for name in LAYOUT_TENSORS:
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_first_build_says_when_numba_compiles(monkeypatch, tmp_path, caplog):
    """Without numba's cache index on disk the first build logs one line saying it compiles;
    with it, or a second time, nothing."""
    from types import SimpleNamespace

    from blocksparse_fsa.preprocess import numba as numba_build

    index = tmp_path / "numba._tile_pass.nbi"
    fake = SimpleNamespace(signatures=[], _cache=SimpleNamespace(
        _cache_file=SimpleNamespace(_index_path=str(index))))
    monkeypatch.setattr(numba_build, "_tile_pass", fake)
    monkeypatch.setattr(numba_build, "_announced", False)
    with caplog.at_level("WARNING", logger="blocksparse_fsa"):
        numba_build._announce_compilation()
        numba_build._announce_compilation()
    assert [r.getMessage() for r in caplog.records if "compiling" in r.getMessage()] == [
        f"blocksparse_fsa: compiling the CPU layout builder with numba (once per machine and "
        f"numba version, 10-60 s; cached in {tmp_path})"]
    caplog.clear()
    index.write_text("")
    monkeypatch.setattr(numba_build, "_announced", False)
    with caplog.at_level("WARNING", logger="blocksparse_fsa"):
        numba_build._announce_compilation()
    assert not caplog.records
