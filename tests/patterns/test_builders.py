"""Pattern builders against brute-force masks written out here by their definitions."""

import itertools
import time

import numpy as np
import pytest
import torch

import blocksparse_fsa as bsa
from blocksparse_fsa import SparseLayout
from blocksparse_fsa import patterns as P
from blocksparse_fsa.preprocess.predicate import band_tiles
from blocksparse_fsa.reference import dense_attention

from ..helpers import LAYOUT_TENSORS, check_layout_invariants

BLOCKS = [(16, 16), (16, 32), (32, 16), (64, 64)]
CAUSAL = pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
TILES = pytest.mark.parametrize("block_m,block_n", BLOCKS, ids=lambda x: str(x))


def check(layout, expected, is_causal, block_m, block_n):
    """``expected``: the brute-force bool mask ``[B, H, Lq, Lk]`` (causality already in it)."""
    expected = torch.as_tensor(expected)
    n_b, n_h, q_len, k_len = expected.shape
    assert (layout.batch, layout.heads, layout.q_len, layout.k_len) == (n_b, n_h, q_len, k_len)
    assert (layout.block_m, layout.block_n, layout.is_causal) == (block_m, block_n, is_causal)
    dense = layout.to_dense_mask()
    if not torch.equal(dense, expected):
        where = (dense != expected).nonzero()[0].tolist()
        raise AssertionError(f"masks differ at (b, h, i, j) = {where}: layout "
                             f"{bool(dense[tuple(where)])}, brute force "
                             f"{bool(expected[tuple(where)])}; {(dense != expected).sum()} pairs")
    assert layout.nnz == int(expected.sum())
    ref = SparseLayout.from_dense_mask(expected, is_causal=is_causal, block_m=block_m,
                                       block_n=block_n)
    for name in LAYOUT_TENSORS:
        assert torch.equal(getattr(layout, name), getattr(ref, name)), name
    check_layout_invariants(layout)


def grid(q_len, k_len):
    """Query positions (bottom-right aligned) and keys, broadcast ``[Lq, 1]`` / ``[1, Lk]``."""
    return np.arange(q_len)[:, None] + (k_len - q_len), np.arange(k_len)[None, :]


def with_causal(mask, is_causal):
    q_len, k_len = mask.shape[-2:]
    if is_causal:
        p, j = grid(q_len, k_len)
        mask = mask & (j <= p)
    return torch.from_numpy(np.ascontiguousarray(mask)).reshape(
        (1,) * (4 - mask.ndim) + mask.shape)


# ---- sliding window --------------------------------------------------------------------------
SLIDING = [  # q_len, k_len, left, right, global_tokens, sinks
    (37, 37, 5, 0, 0, 0),
    (100, 100, 20, 7, 0, 3),
    (64, 64, 15, 15, [0, 63], 0),
    (37, 100, 12, 2, 3, 0),
    (100, 37, 9, 4, [1, 30], 2),
    (100, 100, 0, 0, torch.tensor([50, 7, 50]), 0),
    (64, 64, 200, 200, 0, 0),
]


def sliding_mask(q_len, k_len, left, right, global_tokens, sinks):
    p, j = grid(q_len, k_len)
    glob = (list(range(global_tokens)) if isinstance(global_tokens, int)
            else [int(g) for g in global_tokens])
    mask = ((j >= p - left) & (j <= p + right)) | (j < sinks)
    return mask | np.isin(j, glob) | np.isin(p, glob)


@TILES
@CAUSAL
@pytest.mark.parametrize("case", SLIDING, ids=lambda c: "Lq{}-Lk{}-l{}-r{}-g{}-s{}".format(
    *c[:4], len(c[4]) if not isinstance(c[4], int) else c[4], c[5]))
def test_sliding_window(case, is_causal, block_m, block_n):
    q_len, k_len, left, right, glob, sinks = case
    layout = P.sliding_window(q_len, k_len, left=left, right=right, global_tokens=glob,
                              sinks=sinks, is_causal=is_causal, block_m=block_m,
                              block_n=block_n)
    expected = with_causal(sliding_mask(q_len, k_len, left, right, glob, sinks), is_causal)
    check(layout, expected, is_causal, block_m, block_n)


def test_sliding_window_has_full_tiles_and_defaults_k_len():
    layout = P.sliding_window(256, left=100, block_m=16, block_n=16)
    assert layout.num_full_tiles > 0 and layout.k_len == 256


def test_big_sliding_window_is_fast_and_small():
    # L = 2**16: a dense mask would be 4 GiB; the build must stay analytic and quick
    length, left = 2**16, 256
    start = time.perf_counter()
    layout = P.sliding_window(length, left=left, is_causal=True)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"sliding_window took {elapsed:.1f} s"
    assert layout.nnz == sum(min(i, left) + 1 for i in range(length))
    assert layout.num_tiles == 1024 * 5 - (1 + 2 + 3 + 4)  # kt in qt-4..qt, clipped at 0
    assert layout.nbytes < 8 * 2**20


# ---- dilated window --------------------------------------------------------------------------
@TILES
@CAUSAL
@pytest.mark.parametrize("case", [(100, 100, 5, 3), (37, 37, 4, 2), (64, 100, 3, 7),
                                  (100, 64, 6, 1), (37, 37, 1, 5)],
                         ids=lambda c: "Lq{}-Lk{}-size{}-d{}".format(*c))
def test_dilated_window(case, is_causal, block_m, block_n):
    q_len, k_len, size, dilation = case
    layout = P.dilated_window(q_len, k_len, size=size, dilation=dilation, is_causal=is_causal,
                              block_m=block_m, block_n=block_n)
    expected = np.zeros((q_len, k_len), dtype=bool)
    for i in range(q_len):
        p = i + k_len - q_len
        steps = ([-t for t in range(size)] if is_causal else
                 range(-(size // 2), (size - 1) // 2 + 1))
        for t in steps:
            j = p + dilation * t
            if 0 <= j < k_len:
                expected[i, j] = True
    check(layout, with_causal(expected, False), is_causal, block_m, block_n)


# ---- documents -------------------------------------------------------------------------------
@TILES
@CAUSAL
@pytest.mark.parametrize("cu", [[0, 10, 10, 37, 64, 100], [0, 37], [0, 1, 2, 3, 40, 64]],
                         ids=lambda c: f"docs{len(c) - 1}-L{c[-1]}")
@pytest.mark.parametrize("window", [None, 5, (3, 8)], ids=str)
def test_document(cu, window, is_causal, block_m, block_n):
    layout = P.document(torch.tensor(cu), is_causal=is_causal, window=window, block_m=block_m,
                        block_n=block_n)
    length = cu[-1]
    expected = np.zeros((length, length), dtype=bool)
    for d in range(len(cu) - 1):
        for i in range(cu[d], cu[d + 1]):
            for j in range(cu[d], cu[d + 1]):
                if window is None:
                    inside = True
                elif isinstance(window, int):
                    inside = abs(i - j) < window
                else:
                    inside = i - window[0] <= j <= i + window[1]
                expected[i, j] = inside and (j <= i or not is_causal)
    check(layout, with_causal(expected, False), is_causal, block_m, block_n)


# ---- block patterns --------------------------------------------------------------------------
@TILES
@CAUSAL
@pytest.mark.parametrize("case", [((2, 3, 6, 5), (7, 12), 37, 50), ((4, 4), 16, None, None),
                                  ((3, 3, 2), 40, 100, 64), ((1, 2, 5, 9), (20, 11), 100, 99)],
                         ids=lambda c: f"map{c[0]}-bs{c[1]}-Lq{c[2]}-Lk{c[3]}")
def test_block_sparse(case, is_causal, block_m, block_n):
    shape, block_size, q_len, k_len = case
    g = torch.Generator().manual_seed(sum(shape))
    block_map = torch.rand(shape, generator=g) < 0.4
    block_map[..., 0, 0] = True
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    layout = P.block_sparse(block_map, block_size, q_len, k_len, is_causal=is_causal,
                            block_m=block_m, block_n=block_n)
    q_len, k_len = q_len or shape[-2] * bq, k_len or shape[-1] * bk
    full = block_map.reshape((1,) * (4 - len(shape)) + shape).numpy()
    expected = full.repeat(bq, axis=2).repeat(bk, axis=3)[:, :, :q_len, :k_len]
    check(layout, with_causal(expected, is_causal), is_causal, block_m, block_n)


def test_block_sparse_accepts_integer_maps():
    block_map = torch.tensor([[1, 0], [1, 1]])
    layout = P.block_sparse(block_map, 16, block_m=16, block_n=16)
    assert layout.num_full_tiles == 3 and layout.num_partial_tiles == 0


@TILES
@CAUSAL
@pytest.mark.parametrize("case", [(100, 8, 3, 2, 3, 2), (100, 16, 4, 1, 2, 1), (37, 4, 5, 0, 1, 3),
                                  (64, 16, 1, 1, 10, 1)],
                         ids=lambda c: "L{}-bs{}-local{}-global{}-rand{}-H{}".format(*c))
def test_bigbird(case, is_causal, block_m, block_n):
    q_len, bs, num_local, num_global, num_random, heads = case
    layout = P.bigbird(q_len, block_size=bs, num_local=num_local, num_global=num_global,
                       num_random=num_random, heads=heads, seed=3, is_causal=is_causal,
                       block_m=block_m, block_n=block_n)
    mask = layout.to_dense_mask()
    nb = -(-q_len // bs)
    # the block map: a block is on if any of its pairs is (causality only trims the diagonal)
    padded = torch.nn.functional.pad(mask, (0, nb * bs - q_len, 0, nb * bs - q_len))
    blocks = padded.view(1, heads, nb, bs, nb, bs).any(5).any(3)[0]
    expected = blocks.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :q_len, :q_len]
    check(layout, with_causal(expected[None].numpy(), is_causal), is_causal, block_m, block_n)
    for h in range(heads):
        for r in range(nb):
            local = ([c for c in range(r - num_local + 1, r + 1)] if is_causal else
                     [c for c in range(r - (num_local - 1) // 2, r + num_local // 2 + 1)])
            fixed = {c for c in local if 0 <= c < nb} | set(range(min(num_global, nb)))
            if r < num_global:
                fixed = set(range(nb))
            pool = [c for c in range(nb) if c not in fixed and (c <= r or not is_causal)]
            if is_causal:  # causality removes the blocks after the diagonal
                fixed = {c for c in fixed if c <= r}
            on = set(blocks[h, r].nonzero()[:, 0].tolist())
            assert fixed <= on, (h, r)
            assert on - fixed <= set(pool), (h, r)
            assert len(on - fixed) == min(num_random, len(pool)), (h, r)


def test_bigbird_seed_and_heads():
    def build(seed, heads=1):
        return P.bigbird(640, block_size=16, heads=heads, seed=seed,
                         block_m=16, block_n=16).to_dense_mask()
    assert torch.equal(build(0), build(0))
    assert not torch.equal(build(0), build(1))
    two = build(0, heads=2)
    assert torch.equal(two[:, :1], build(0)) and not torch.equal(two[:, 0], two[:, 1])


def deepspeed_fixed(nb, heads, nl, ng, attention, horizontal, ndgp):
    """DeepSpeed FixedSparsityConfig.set_local_layout / set_global_layout, transcribed."""
    layout = np.zeros((heads, nb, nb), dtype=bool)
    for h in range(heads):
        for i in range(0, nb, nl):
            end = min(i + nl, nb)
            for row in range(i, end):
                for col in range(i, row + 1 if attention == "unidirectional" else end):
                    layout[h, row, col] = True
        first = nl - (1 + h % ndgp) * ng
        end = nb - (nb % nl)
        for i in range(first, end, nl):
            first_row = 0 if attention == "bidirectional" else i
            layout[h, first_row:, i:i + ng] = True
            if horizontal:
                layout[h, i:i + ng, :] = True
        if end < nb:
            start = min(end + first, nb - ng)
            end = start + ng
            first_row = 0 if attention == "bidirectional" else start
            layout[h, first_row:, start:end] = True
            if horizontal:
                layout[h, start:end, :] = True
    return layout


@TILES
@pytest.mark.parametrize("case", [(100, 8, 4, 1, False, False, 1, 1),
                                  (100, 8, 4, 2, False, True, 2, 3),
                                  (100, 8, 4, 2, True, False, 1, 1),
                                  (96, 16, 3, 1, True, False, 3, 3),
                                  (37, 4, 4, 2, True, False, 1, 1),
                                  (64, 4, 6, 3, False, False, 2, 2)],
                         ids=lambda c: "L{}-bs{}-local{}-global{}-causal{}-hor{}-pat{}-H{}"
                         .format(*c))
def test_fixed_matches_deepspeed(case, block_m, block_n):
    q_len, bs, nl, ng, is_causal, horizontal, ndgp, heads = case
    layout = P.fixed(q_len, block_size=bs, num_local_blocks=nl, num_global_blocks=ng,
                     is_causal=is_causal, horizontal_global=horizontal,
                     num_different_global_patterns=ndgp, heads=heads, block_m=block_m,
                     block_n=block_n)
    nb = -(-q_len // bs)
    blocks = deepspeed_fixed(nb, heads, nl, ng, "unidirectional" if is_causal else
                             "bidirectional", horizontal, ndgp)
    expected = blocks.repeat(bs, axis=1).repeat(bs, axis=2)[:, :q_len, :q_len]
    check(layout, with_causal(expected[None], is_causal), is_causal, block_m, block_n)


# ---- neighborhood attention ------------------------------------------------------------------
def natten_window_start(index, length, kernel_size, dilation):
    """NATTEN's ``get_window_start`` (CPU kernels), odd kernel sizes."""
    ns = kernel_size // 2
    if dilation <= 1:
        return max(index - ns, 0) + (index + ns >= length) * (length - index - ns - 1)
    ni = index - ns * dilation
    if ni < 0:
        return index % dilation
    if index + ns * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * ns * dilation
        return a + imodd - kernel_size * dilation
    return ni


def natten_axis_keys(x, n, k, d, causal):
    """Coordinates a query at ``x`` sees on one axis."""
    if causal:  # NATTEN's causal mask: same residue, 0 <= x - y < k * d
        return [y for y in range(n) if y % d == x % d and 0 <= x - y < k * d]
    if k % 2:
        start = natten_window_start(x, n, k, d)
        return [start + t * d for t in range(k)]
    # even kernels (NATTEN >= 0.20): centre clamped into [k//2, n_r - k//2] in the group
    n_r = len(range(x % d, n, d))
    centre = min(max(x // d, k // 2), n_r - k // 2)
    return [(centre + t) * d + x % d for t in range(-(k // 2), k // 2)]


def natten_mask(shape, kernel, dilation, causal):
    cells = list(itertools.product(*(range(n) for n in shape)))
    index = {c: t for t, c in enumerate(cells)}
    mask = np.zeros((len(cells), len(cells)), dtype=bool)
    for c in cells:
        per_axis = [natten_axis_keys(x, n, k, d, cz)
                    for x, n, k, d, cz in zip(c, shape, kernel, dilation, causal)]
        for key in itertools.product(*per_axis):
            mask[index[c], index[key]] = True
    return mask


NEIGHBORHOOD = [  # shape, kernel_size, dilation, is_causal
    ((7, 9), 3, 1, (False, False)),
    ((7, 9), (3, 5), (2, 1), (False, False)),
    ((7, 9), 3, (1, 3), (True, False)),
    ((7, 9), 5, 1, (True, True)),
    ((7, 9), (4, 2), 1, (False, True)),
    ((3, 5, 6), 3, 1, (False, False, False)),
    ((3, 5, 6), 3, (1, 1, 2), (False, True, False)),
    ((3, 5, 6), (1, 3, 5), 1, (True, True, True)),
    ((37,), 5, 3, (False,)),
    ((37,), 7, 1, (True,)),
]


@TILES
@pytest.mark.parametrize("case", NEIGHBORHOOD, ids=lambda c: "{}-k{}-d{}-c{}".format(
    "x".join(map(str, c[0])), c[1], c[2], "".join(str(int(x)) for x in c[3])))
def test_neighborhood(case, block_m, block_n):
    shape, kernel, dilation, causal = case
    n_dim = len(shape)
    build = {1: P.neighborhood_1d, 2: P.neighborhood_2d, 3: P.neighborhood_3d}[n_dim]
    layout = build(*shape, kernel_size=kernel, dilation=dilation,
                   is_causal=causal if n_dim > 1 else causal[0], block_m=block_m,
                   block_n=block_n)
    per_axis = [(x if isinstance(x, tuple) else (x,) * n_dim) for x in (kernel, dilation)]
    expected = natten_mask(shape, per_axis[0], per_axis[1], causal)
    check(layout, with_causal(expected, False), all(causal), block_m, block_n)


# ---- the generic engine ----------------------------------------------------------------------
@pytest.mark.parametrize("chunk_pairs", [100, 4096, 2**22], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("hinted", [False, True], ids=["plain", "hints"])
def test_layout_from_predicate_with_batch_heads_and_chunks(chunk_pairs, hinted):
    q_len, k_len, bm, bn = 70, 90, 16, 32

    def predicate(b, h, q, k):  # head h: keys within 3 * (h + 1) of q; batch 1 adds key 0
        return ((q - k).abs() <= 3 * (h + 1)) | ((b == 1) & (k == 0))

    def candidates(block_m, block_n):
        may = torch.stack([band_tiles(q_len, k_len, block_m, block_n, -3 * (h + 1),
                                        3 * (h + 1) + k_len - q_len, "cpu")[0]
                           for h in range(3)])[None].repeat(2, 1, 1, 1)
        may[1, :, :, 0] = True
        return may

    full = (lambda block_m, block_n: torch.stack([
        band_tiles(q_len, k_len, block_m, block_n, -3 * (h + 1) + k_len - q_len,
                     3 * (h + 1) + k_len - q_len, "cpu")[1] for h in range(3)])) if hinted else None
    layout = P.layout_from_predicate(q_len, k_len, predicate, candidates, batch=2, heads=3,
                                     block_m=bm, block_n=bn, full_tiles=full,
                                     chunk_pairs=chunk_pairs)
    i, j = np.arange(q_len)[:, None], np.arange(k_len)[None, :]
    expected = np.zeros((2, 3, q_len, k_len), dtype=bool)
    for b, h in itertools.product(range(2), range(3)):
        expected[b, h] = (np.abs(i - j) <= 3 * (h + 1)) | ((b == 1) & (j == 0))
    check(layout, torch.from_numpy(expected), False, bm, bn)


@CAUSAL
def test_layout_from_predicate_without_candidates_is_exact(is_causal):
    def predicate(b, h, q, k):
        return (q * 7 + k * 3) % 5 == 0

    layout = P.layout_from_predicate(41, 29, predicate, is_causal=is_causal, block_m=16,
                                     block_n=16)
    i, j = np.arange(41)[:, None], np.arange(29)[None, :]
    check(layout, with_causal((i * 7 + j * 3) % 5 == 0, is_causal), is_causal, 16, 16)


def test_candidates_limit_the_pattern():
    may = torch.zeros(3, 3, dtype=torch.bool)
    may[1, 2] = True
    layout = P.layout_from_predicate(48, 48, lambda b, h, q, k: torch.tensor(True), may,
                                     block_m=16, block_n=16)
    assert layout.num_full_tiles == 1 and layout.nnz == 256


# ---- union and intersection ------------------------------------------------------------------
@TILES
def test_union_and_intersection(block_m, block_n):
    kw = dict(block_m=block_m, block_n=block_n)
    window = P.sliding_window(100, left=9, is_causal=True, **kw)
    docs = P.document(torch.tensor([0, 30, 31, 100]), is_causal=True, **kw)
    blocks = P.block_sparse(torch.rand(2, 7, 7, generator=torch.Generator().manual_seed(0))
                            < 0.3, 16, 100, 100, **kw)
    dilated = P.dilated_window(100, size=9, dilation=4, **kw)
    masks = {id(x): x.to_dense_mask() for x in (window, docs, blocks, dilated)}
    for parts in [(window, docs), (window, blocks), (blocks, dilated, docs), (window,),
                  (docs, window, docs)]:
        dense = [masks[id(x)] for x in parts]
        union, inter = P.union(*parts), P.intersection(*parts)
        or_mask, and_mask = dense[0], dense[0]
        for m in dense[1:]:
            or_mask, and_mask = or_mask | m, and_mask & m
        check(union, or_mask.expand(union.batch, union.heads, -1, -1).contiguous(),
              all(x.is_causal for x in parts), block_m, block_n)
        check(inter, and_mask.expand(inter.batch, inter.heads, -1, -1).contiguous(),
              any(x.is_causal for x in parts), block_m, block_n)


def test_union_of_halves_becomes_full():
    left = P.block_sparse(torch.tensor([[True, False]]), (32, 8), block_m=32, block_n=16)
    right = P.block_sparse(torch.tensor([[False, True]]), (32, 8), block_m=32, block_n=16)
    assert left.num_full_tiles == 0 and right.num_full_tiles == 0
    both = P.union(left, right)
    assert both.num_full_tiles == 1 and both.num_partial_tiles == 0 and both.nnz == 32 * 16
    assert P.intersection(left, right).num_tiles == 0


# ---- through the attention API ---------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_builder_layout_runs_through_sparse_attn_func(backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 37, 4, 16, generator=g)
    k, v = torch.randn(1, 37, 2, 16, generator=g), torch.randn(1, 37, 2, 16, generator=g)
    layout = P.sliding_window(37, left=6, global_tokens=[3], sinks=2, is_causal=True,
                              block_m=16, block_n=16)
    expected = with_causal(sliding_mask(37, 37, 6, 0, [3], 2), True)
    out, lse = bsa.sparse_attn_func(q, k, v, layout=layout, return_lse=True, backend=backend)
    ref_out, ref_lse = dense_attention(q.double(), k.double(), v.double(), expected)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=1e-5)

    heads = P.block_sparse(torch.rand(2, 3, 3, generator=g) < 0.5, 13, 37, 37, block_m=16,
                           block_n=16)
    out = bsa.sparse_attn_func(q, k, v, layout=heads, backend=backend)
    ref_out, _ = dense_attention(q.double(), k.double(), v.double(), heads.to_dense_mask())
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)


# ---- bad arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize("build,match", [
    (lambda: P.sliding_window(50, left=-1), "left"),
    (lambda: P.sliding_window(50, left=3, right=1.5), "right"),
    (lambda: P.sliding_window(0, left=3), "q_len"),
    (lambda: P.sliding_window(50, 20, left=3, sinks=21), "sinks"),
    (lambda: P.sliding_window(50, left=3, global_tokens=[50]), "global_tokens"),
    (lambda: P.sliding_window(50, left=3, global_tokens=51), "global_tokens"),
    (lambda: P.sliding_window(50, left=3, block_m=48), "block_m"),
    (lambda: P.dilated_window(50, size=0, dilation=2), "size"),
    (lambda: P.dilated_window(50, size=3, dilation=0), "dilation"),
    (lambda: P.document(torch.tensor([1, 10])), "cu_seqlens"),
    (lambda: P.document(torch.tensor([0, 10, 5])), "cu_seqlens"),
    (lambda: P.document(torch.tensor([0, 10]), window=0), "window"),
    (lambda: P.block_sparse(torch.ones(3, 3, dtype=torch.bool), 16, 60), "q_len"),
    (lambda: P.block_sparse(torch.ones(3, dtype=torch.bool), 16), "block_map"),
    (lambda: P.block_sparse(torch.ones(3, 3, dtype=torch.bool), 0), "block_size"),
    (lambda: P.bigbird(100, num_local=-1), "num_local"),
    (lambda: P.bigbird(100, heads=0), "heads"),
    (lambda: P.fixed(100, block_size=8, num_local_blocks=4, num_global_blocks=3),
     "num_local_blocks"),
    (lambda: P.fixed(100, block_size=8, num_local_blocks=4, num_different_global_patterns=5),
     "num_different_global_patterns"),
    (lambda: P.fixed(100, block_size=8, num_local_blocks=4, is_causal=True,
                     horizontal_global=True), "horizontal_global"),
    (lambda: P.neighborhood_2d(7, 9, kernel_size=3, dilation=3), "kernel_size"),
    (lambda: P.neighborhood_2d(7, 9, kernel_size=(3, 3, 3)), "kernel_size"),
    (lambda: P.neighborhood_2d(7, 9, kernel_size=3, is_causal=(True,)), "is_causal"),
    (lambda: P.neighborhood_3d(3, 0, 6, kernel_size=1), "height"),
    (lambda: P.layout_from_predicate(40, 40, lambda b, h, q, k: q == k,
                                     torch.ones(2, 2, dtype=torch.bool)), "tile_candidates"),
    (lambda: P.layout_from_predicate(40, 40, lambda b, h, q, k: q == k, batch=0), "batch"),
    (lambda: P.union(P.sliding_window(40, left=2), P.sliding_window(41, left=2)), "q_len"),
    (lambda: P.union(), "layouts"),
])
def test_bad_arguments_raise_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="predicate must return a bool"):
        P.layout_from_predicate(40, 40, lambda b, h, q, k: q - k)
    with pytest.raises(TypeError, match="block_map"):
        P.block_sparse(torch.ones(2, 2), 16)
