"""Token permutations: the same attention in the callers' order, on fewer, denser tiles."""

import pytest
import scipy.sparse as sp
import torch

import blocksparse_fsa as bsa
from blocksparse_fsa.reference import dense_attention

from ..helpers import INTERPRET


def dilated_indices(length, size, dilation, k_len=None):
    """Query i (bottom-right aligned to ``k_len`` keys) sees keys i, i - d, ..., size of them."""
    i = torch.arange(length)[:, None] + ((k_len or length) - length)
    idx = i - dilation * torch.arange(size)[None, :]
    return torch.where(idx >= 0, idx, -1)[None, None]


def attention_and_grads(layout, q, k, v, dout, backend):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = bsa.sparse_attn_func(q, k, v, layout=layout, return_lse=True, backend=backend)
    return (out, lse, *torch.autograd.grad((out * dout).sum(), (q, k, v)))


@pytest.mark.parametrize("q_len,k_len,computed", [(256, 256, True), (192, 256, True),
                                                  (250, 250, False), (200, 200, False)],
                         ids=["L256", "Lq192-Lk256", "L250-read", "L200-read"])
@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if INTERPRET else []))
def test_dilation_reorder_is_invisible_and_denser(backend, q_len, k_len, computed):
    """Residue groups of whole tiles (length / dilation a multiple of 16 here) let the kernels
    compute the order (``perm_dilation``); other lengths read ``q_perm`` / ``k_perm``."""
    dilation = 4
    idx = dilated_indices(q_len, 32, dilation, k_len).expand(1, 2, -1, -1)
    plain = bsa.build_layout(idx, k_len, is_causal=True, block_m=16, block_n=16)
    packed = bsa.build_layout(idx, k_len, is_causal=True, block_m=16, block_n=16,
                              reorder=("dilation", dilation))
    assert packed.perm_dilation == (dilation if computed else 0)
    assert packed.unordered().perm_dilation == 0
    assert packed.is_reordered and packed.is_causal and packed.nnz == plain.nnz
    assert torch.equal(packed.to_dense_mask(), plain.to_dense_mask())
    assert torch.equal(packed.to_indices(), plain.to_indices())
    assert packed.density > 2 * plain.density and packed.num_tiles < plain.num_tiles
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, q_len, 4, 16, generator=g)
    k, v = (torch.randn(1, k_len, 2, 16, generator=g) for _ in range(2))
    dout = torch.randn(1, q_len, 4, 16, generator=g)
    for a, b in zip(attention_and_grads(packed, q, k, v, dout, backend),
                    attention_and_grads(plain, q, k, v, dout, backend)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ref, _ = dense_attention(q.double(), k.double(), v.double(), plain.to_dense_mask())
    out = bsa.sparse_attn_func(q, k, v, layout=packed, backend=backend)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_rcm_recovers_a_shuffled_band():
    length = 192
    i = torch.arange(length)[:, None]
    band = (i + torch.arange(-6, 7)[None, :]).clamp(-1, length - 1)
    band = torch.where((band >= 0) & (band < length), band, -1)
    shuffle = torch.randperm(length, generator=torch.Generator().manual_seed(1))
    inv = torch.empty_like(shuffle)
    inv[shuffle] = torch.arange(length)
    # the same band in a scrambled token order: query shuffle[a] attends keys shuffle[b]
    scrambled = torch.where(band >= 0, shuffle[band.clamp(min=0)], -1)[inv][None, None]
    plain = bsa.build_layout(scrambled, length, block_m=16, block_n=16)
    packed = plain.reordered("rcm")
    assert torch.equal(packed.to_dense_mask(), plain.to_dense_mask())
    assert packed.num_tiles < plain.num_tiles / 3
    q, k, v = (torch.randn(1, length, 2, 16) for _ in range(3))
    torch.testing.assert_close(bsa.sparse_attn_func(q, k, v, layout=packed),
                               bsa.sparse_attn_func(q, k, v, layout=plain), atol=1e-5, rtol=1e-5)


def test_explicit_permutations_with_unequal_lengths_and_exports():
    q_len, k_len = 40, 56
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(-1, k_len, (2, 1, q_len, 5), generator=g)
    plain = bsa.build_layout(idx, k_len, is_causal=True, block_m=16, block_n=16)
    perms = (torch.randperm(q_len, generator=g), torch.randperm(k_len, generator=g))
    packed = plain.reordered(perms)
    assert torch.equal(packed.to_dense_mask(), plain.to_dense_mask())
    assert torch.equal(packed.to_indices(), plain.to_indices())
    for row_a, row_b in zip(packed.to_scipy(), plain.to_scipy()):
        for a, b in zip(row_a, row_b):
            assert (a != b).nnz == 0
    with pytest.raises(ValueError, match="without a token permutation"):
        packed.to_flex_block_mask()
    q, dout = (torch.randn(2, q_len, 2, 16, generator=g) for _ in range(2))
    k, v = (torch.randn(2, k_len, 1, 16, generator=g) for _ in range(2))
    for a, b in zip(attention_and_grads(packed, q, k, v, dout, "auto"),
                    attention_and_grads(plain, q, k, v, dout, "auto")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert packed.to("cpu") is packed and "reordered=True" in repr(packed)


@pytest.mark.parametrize("reorder,error,match", [
    ("natural", ValueError, "reorder must be"),
    (("dilation", 0), ValueError, "dilation must be"),
    ((torch.arange(10), torch.arange(20)), ValueError, "q_perm must have 20 entries"),
    ((torch.zeros(20, dtype=torch.long), torch.arange(20)), ValueError, "permutation"),
    ((torch.arange(20.0), torch.arange(20)), TypeError, "q_perm must be"),
])
def test_bad_reorder_arguments(reorder, error, match):
    layout = bsa.build_layout(dilated_indices(20, 3, 2), 20, block_m=16, block_n=16)
    with pytest.raises(error, match=match):
        layout.reordered(reorder)
    with pytest.raises(ValueError, match="already reordered"):
        layout.reordered(("dilation", 2)).reordered(("dilation", 2))


def test_rcm_needs_square_patterns():
    layout = bsa.build_layout(torch.zeros(1, 1, 20, 1, dtype=torch.long), 30)
    with pytest.raises(ValueError, match="q_len == k_len"):
        layout.reordered("rcm")
    assert sp.issparse(layout.to_scipy()[0][0])


def test_reordered_layouts_are_not_combined():
    layout = bsa.build_layout(dilated_indices(40, 4, 2), 40, block_m=16, block_n=16)
    with pytest.raises(ValueError, match="before reordering"):
        bsa.patterns.union(layout, layout.reordered(("dilation", 2)))


def test_reorder_checks_the_indices_first():
    with pytest.raises(ValueError, match=r"attn_indices must lie in \[-1, k_len=20\)"):
        bsa.build_layout(torch.full((1, 1, 20, 2), 25), 20, reorder=("dilation", 2))


def test_bias_follows_the_permutation():
    length = 96
    idx = dilated_indices(length, 16, 3)
    plain = bsa.build_layout(idx, length, is_causal=True, block_m=16, block_n=16)
    packed = plain.reordered(("dilation", 3))
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, length, 2, 16, generator=g) for _ in range(3))
    for shape in [(1, 2, length, length), (1, 1, 1, length)]:
        bias = torch.randn(shape, generator=g)
        results = []
        for layout in (plain, packed):
            b = bias.clone().requires_grad_()
            out = bsa.sparse_attn_func(q, k, v, layout=layout, attn_bias=b)
            results.append((out, *torch.autograd.grad(out.square().sum(), (b,))))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dilation_of_recognises_only_dilation_orders():
    from blocksparse_fsa.layout.reorder import dilation_of, dilation_order
    assert dilation_of(dilation_order(64, 4, offset=32), dilation_order(96, 4), 16, 8) == 4
    assert dilation_of(dilation_order(128, 8), dilation_order(128, 8), 16, 16) == 8
    assert dilation_of(dilation_order(96, 4), dilation_order(96, 4), 16, 16) == 0  # 24 % 16
    assert dilation_of(dilation_order(90, 3), dilation_order(90, 3), 16, 16) == 0
    assert dilation_of(dilation_order(128, 4), dilation_order(128, 2), 16, 16) == 0  # mixed
    shuffled = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    assert dilation_of(shuffled, shuffled, 16, 16) == 0
