"""CPU tests of the benchmark's patterns: every builder against its brute-force definition, its
dense mask, flex mask_mod and nnz against its indices, and the loading of user patterns."""

import pytest
import torch

from blocksparse_fsa_bench import patterns as bp

from ..helpers import EXAMPLE, USER_MODULE, brute_mask, row_sets, small_patterns

L, HKV = 256, 2


def check_common(pattern, width):
    idx = pattern.indices
    assert idx.shape == (1, HKV, pattern.seq_len, width)
    assert idx.dtype == torch.int32 and idx.is_contiguous()
    assert int(idx.min()) >= -1 and int(idx.max()) < pattern.seq_len


@pytest.mark.parametrize("window", [1024, 32, 1])
def test_sliding_window(window):
    p = bp.sliding_window(L, HKV, "cpu", window=window)
    check_common(p, min(window, L))
    for h in range(HKV):
        for i, keys in enumerate(row_sets(p, h)):
            assert keys == set(range(max(0, i - window + 1), i + 1)), i
    assert not p.per_head


@pytest.mark.parametrize("num_keys,stride", [(512, 4), (8, 3)])
def test_dilated(num_keys, stride):
    p = bp.dilated(L, HKV, "cpu", num_keys=num_keys, stride=stride)
    check_common(p, num_keys)
    for i, keys in enumerate(row_sets(p)):
        assert keys == {i - stride * t for t in range(num_keys) if i - stride * t >= 0}, i
    # no slot is lost to the causal cut: -1 exactly where i - stride * t < 0
    assert int((p.indices >= 0).sum()) == HKV * sum(len(s) for s in row_sets(p))


@pytest.mark.parametrize("seq_len,block", [(256, 16), (250, 16), (64, 64)])
def test_bigbird(seq_len, block):
    p = bp.bigbird(seq_len, HKV, "cpu", block=block, seed=3)
    nb = -(-seq_len // block)
    check_common(p, 8 * block)
    blocks = bp.bigbird_blocks(seq_len, HKV, "cpu", block=block, seed=3)
    assert blocks.shape == (HKV, nb, 8)
    for h in range(HKV):
        for qb in range(nb):
            local = [b for b in (qb - 2, qb - 1, qb) if b >= 0]
            glob = [b for b in (0, 1) if b < nb]
            rnd = [b for b in blocks[h, qb, 5:].tolist() if b >= 0]
            assert blocks[h, qb, :5].tolist() == [qb - 2 if qb >= 2 else -1,
                                                  qb - 1 if qb >= 1 else -1, qb,
                                                  0, 1 if nb > 1 else -1]
            assert len(rnd) == min(3, qb) and len(set(rnd)) == len(rnd)
            assert all(0 <= b < qb for b in rnd)
            allowed = set(local) | set(glob) | set(rnd)
            for i in range(qb * block, min((qb + 1) * block, seq_len)):
                want = {j for b in allowed for j in range(b * block, min((b + 1) * block, seq_len))
                        if j <= i}
                assert row_sets(p, h)[i] == want, (h, i)
    assert p.per_head
    # random blocks differ between heads and are reproducible
    again = bp.bigbird_blocks(seq_len, HKV, "cpu", block=block, seed=3)
    assert torch.equal(blocks, again)


def test_bigbird_default_width():
    p = bp.bigbird(1024, HKV, "cpu")
    check_common(p, 512)


@pytest.mark.parametrize("seq_len,block,num_selected", [(256, 16, 5), (250, 16, 5), (256, 16, 16),
                                                      (64, 64, 16)])
def test_nsa_blocks(seq_len, block, num_selected):
    p = bp.nsa_blocks(seq_len, HKV, "cpu", block=block, num_selected=num_selected, seed=3)
    nb = -(-seq_len // block)
    check_common(p, num_selected * block)
    blocks = bp.nsa_block_table(seq_len, HKV, "cpu", block=block, num_selected=num_selected,
                                seed=3)
    assert blocks.shape == (HKV, nb, num_selected)
    for h in range(HKV):
        for qb in range(nb):
            chosen = [b for b in blocks[h, qb].tolist() if b >= 0]
            assert chosen == sorted(set(chosen)), (h, qb)  # distinct, ascending
            assert blocks[h, qb, len(chosen):].eq(-1).all()  # padding last
            assert len(chosen) == min(num_selected, qb + 1)  # all causal blocks when few
            assert all(0 <= b <= qb for b in chosen)  # causal blocks only
            assert {0, max(qb - 1, 0), qb} <= set(chosen)  # initial, local, diagonal
            for i in range(qb * block, min((qb + 1) * block, seq_len)):
                want = {j for b in chosen for j in range(b * block, min((b + 1) * block, seq_len))
                        if j <= i}  # causal inside the diagonal block
                assert row_sets(p, h)[i] == want, (h, i)
    assert p.per_head
    assert torch.equal(blocks, bp.nsa_block_table(seq_len, HKV, "cpu", block=block,
                                                  num_selected=num_selected, seed=3))
    if nb > num_selected:  # heads draw independently
        assert not torch.equal(blocks[0], blocks[1])


def test_nsa_blocks_draw_uniformly():
    """The 13 free blocks of the last query block are uniform over the 37 unforced candidates
    (400 heads as 400 draws: each candidate expected 400 * 13 / 37 = 141 times, sd 9.5)."""
    blocks = bp.nsa_block_table(40, 400, "cpu", block=1, seed=0)[:, -1]  # [400, 16]
    free = blocks[(blocks >= 1) & (blocks <= 37)]
    assert free.numel() == 400 * 13
    counts = torch.bincount(free, minlength=38)[1:]
    assert int(counts.min()) > 95 and int(counts.max()) < 190, counts.tolist()


def test_nsa_blocks_defaults():
    p = bp.nsa_blocks(2048, HKV, "cpu")  # 32 blocks of 64: 16 of them from 32 query blocks on
    check_common(p, 16 * 64)
    assert int((p.indices[0, :, -1] >= 0).sum(-1).min()) == 16 * 64
    with pytest.raises(ValueError, match="num_selected"):
        bp.nsa_block_table(256, HKV, "cpu", num_selected=2)


@pytest.mark.parametrize("k", [1024, 16])
def test_topk_random(k):
    p = bp.topk_random(L, HKV, "cpu", k=k, seed=1)
    check_common(p, k)
    idx = p.indices[0]
    rows = torch.arange(L)[:, None]
    valid = idx >= 0
    assert bool(((idx <= rows) | ~valid).all())  # within the causal prefix [0, i]
    short = (rows[:, 0] + 1 <= k)
    # short rows: all of [0, i] exactly once, the rest -1
    for i in torch.nonzero(short)[:, 0].tolist():
        for h in range(HKV):
            assert sorted(x for x in idx[h, i].tolist() if x >= 0) == list(range(i + 1))
    # long rows: k draws, all valid
    assert bool(valid[:, ~short].all())
    assert p.per_head
    assert torch.equal(p.indices, bp.topk_random(L, HKV, "cpu", k=k, seed=1).indices)
    if (~short).any():
        assert not torch.equal(idx[0, ~short], idx[1, ~short])  # heads draw independently


@pytest.mark.parametrize("pattern", small_patterns(), ids=lambda p: p.name)
def test_masks_agree_with_indices(pattern):
    want = brute_mask(pattern)
    # dense mask (sdpa_mask, topk's flex tensor)
    dense = pattern.dense_mask()
    assert dense.shape == (1, HKV if pattern.per_head else 1, L, L)
    assert torch.equal(dense[0].expand_as(want), want)
    # flex mask_mod on the full grid
    mask_mod = pattern.flex_mask()
    h = torch.arange(pattern.num_kv_heads)[:, None, None]
    q = torch.arange(L)[None, :, None]
    kv = torch.arange(L)[None, None, :]
    got = mask_mod(torch.zeros((), dtype=torch.long), h, q, kv)
    assert torch.equal(got.expand_as(want), want)
    # nnz
    assert pattern.nnz() == int(want.sum())
    assert bp.count_nnz(pattern.indices, L, causal=True) == int(want.sum())


# ---- user patterns ------------------------------------------------------------------------------
@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``user_patterns.py`` in a fresh directory on ``sys.path``; returns its path."""
    path = tmp_path / "user_patterns.py"
    path.write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def window_mask(seq_len, window=512, globals_=64):
    """The example's pattern, brute force: ``[L, L]`` bool."""
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    return (j <= i) & ((i - j < window) | (j < globals_))


def test_load_builtin_pattern():
    assert bp.load_pattern("nsa_blocks") == ("nsa_blocks", bp.nsa_blocks)


@pytest.mark.parametrize("fn", ["window_and_globals", "window_and_globals_with_mask"])
def test_user_pattern_from_file(fn):
    """The README's example: indices shared by the heads, with or without a mask_mod."""
    name, build = bp.load_pattern(f"{EXAMPLE}:{fn}")
    assert name == f"bench_my_pattern:{fn}"
    p = build(L, HKV, torch.device("cpu"))
    assert p.name == name and p.indices.shape == (1, 1, L, 576) and p.layout is None
    assert not p.per_head and p.groups == 1 and "user pattern" in p.description
    want = window_mask(L)
    assert torch.equal(p.dense_mask(), want[None, None])
    assert p.nnz() == int(want.sum())
    assert torch.equal(p.exact_layout(128).to_dense_mask(), want[None, None])
    if fn.endswith("with_mask"):
        got = p.flex_mask()(torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long),
                            torch.arange(L)[:, None], torch.arange(L)[None, :])
        assert torch.equal(got, want)
    else:
        assert p.flex_mask is None


def test_user_pattern_from_module_layout(user_module):
    """A per-head, non-causal SparseLayout is taken as it stands."""
    name, build = bp.load_pattern("user_patterns:random_layout")
    assert name == "user_patterns:random_layout"
    p = build(L, HKV, "cpu")
    assert p.indices is None and p.per_head and p.num_kv_heads == HKV and p.batch == 1
    want = p.layout.to_dense_mask()
    assert bool(want.triu(1).any())  # not made causal
    assert torch.equal(p.dense_mask(), want) and p.nnz() == int(want.sum())
    exact = p.exact_layout(128)
    assert (exact.block_m, exact.block_n) == (128, 128)
    assert torch.equal(exact.to_dense_mask(), want)


def test_user_pattern_batched(user_module):
    p = bp.load_pattern(f"{user_module}:batched")[1](L, HKV, "cpu")
    assert (p.batch, p.num_kv_heads, p.groups) == (2, 1, 2)
    dense = p.dense_mask()
    assert dense.shape == (2, 1, L, L)
    i = torch.arange(L)[:, None]
    for b, stride in enumerate((1, 2)):
        d = i - torch.arange(L)[None, :]
        assert torch.equal(dense[b, 0], (d >= 0) & (d % stride == 0) & (d < 3 * stride))
    assert p.nnz() == int(dense.sum())
    assert torch.equal(p.exact_layout(128).to_dense_mask(), dense)


@pytest.mark.parametrize("spec,error,match", [
    ("slidingwindow", ValueError, "unknown pattern"),
    ("user_patterns:", ValueError, "unknown pattern"),
    ("no_such_module_xyz:f", ModuleNotFoundError, "no_such_module_xyz"),
    ("user_patterns:nope", AttributeError, "nope"),
    ("user_patterns:NOT_CALLABLE", TypeError, "not a function"),
    ("missing/file.py:f", FileNotFoundError, "missing/file.py"),
])
def test_load_pattern_errors(user_module, spec, error, match):
    with pytest.raises(error, match=match):
        bp.load_pattern(spec)


@pytest.mark.parametrize("fn,error,match", [
    ("float_indices", TypeError, "integer"),
    ("three_heads", ValueError, "3 heads; expected 1 or 2"),
    ("short", ValueError, "shape"),
    ("wrong_layout_length", ValueError, "q_len=257"),
    ("a_string", TypeError, "returned a str"),
    ("a_triple", TypeError, "tuple of 3"),
])
def test_user_pattern_errors(user_module, fn, error, match):
    build = bp.load_pattern(f"user_patterns:{fn}")[1]
    with pytest.raises(error, match=match):
        build(L, HKV, "cpu")
