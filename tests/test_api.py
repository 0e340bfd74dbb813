"""The public API: every bad input gets a clear error naming the argument; layout handling."""

import math

import pytest
import torch

import blocksparse_fsa as bsa
from blocksparse_fsa.reference import dense_attention

from .helpers import window_indices


def qkv(batch=1, q_len=20, k_len=20, hq=4, hkv=2, dim=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, q_len, hq, dim, generator=g, dtype=dtype),
            torch.randn(batch, k_len, hkv, dim, generator=g, dtype=dtype),
            torch.randn(batch, k_len, hkv, dim, generator=g, dtype=dtype))


def call(**overrides):
    q, k, v = qkv()
    args = dict(query=q, key=k, value=v)
    args.update(overrides)
    return bsa.sparse_attn_func(**args)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(query=torch.randn(20, 4, 16)), ValueError, "query must have shape"),
    (dict(key=torch.randn(1, 20, 2)), ValueError, "key must have shape"),
    (dict(value=[1, 2]), TypeError, "value must be a torch.Tensor"),
    (dict(query=torch.randn(1, 20, 4, 16, dtype=torch.float64)), TypeError, "query must be"),
    (dict(query=torch.randn(1, 20, 4, 16).half()), TypeError, "share a dtype"),
    (dict(value=torch.randn(1, 21, 2, 16)), ValueError, "same shape"),
    (dict(query=torch.randn(2, 20, 4, 16)), ValueError, "batch"),
    (dict(query=torch.randn(1, 20, 3, 16)), ValueError, "multiple of key/value heads"),
    (dict(query=torch.randn(1, 20, 4, 8)), ValueError, "head_dim"),
    (dict(query=torch.randn(1, 20, 4, 320), key=torch.randn(1, 20, 2, 320),
          value=torch.randn(1, 20, 2, 320)), ValueError, r"head_dim 320 is not supported"),
    (dict(attn_indices=torch.zeros(1, 2, 20, 3)), TypeError, "attn_indices must be an integer"),
    (dict(attn_indices=torch.zeros(1, 2, 20, dtype=torch.long)), ValueError,
     "attn_indices must be 4-D"),
    (dict(attn_indices=torch.full((1, 2, 20, 3), 20)), ValueError,
     r"attn_indices must lie in \[-1, k_len=20\); found 20 at position \(0, 0, 0, 0\)"),
    (dict(attn_indices=torch.full((1, 2, 20, 3), -2)), ValueError, "found -2"),
    (dict(attn_indices=torch.zeros(1, 3, 20, 3, dtype=torch.long)), ValueError,
     "attn_indices has 3 heads"),
    (dict(attn_indices=torch.zeros(2, 2, 20, 3, dtype=torch.long)), ValueError,
     "attn_indices has batch 2"),
    (dict(attn_indices=torch.zeros(1, 2, 19, 3, dtype=torch.long)), ValueError,
     "attn_indices has 19 query rows"),
    (dict(attn_mask=torch.ones(1, 1, 20, 20)), TypeError, "attn_mask must be a torch.bool"),
    (dict(attn_mask=torch.ones(1, 1, 20, 21, dtype=torch.bool)), ValueError,
     "attn_mask has 21 key columns"),
    (dict(attn_mask=torch.ones(1, 3, 20, 20, dtype=torch.bool)), ValueError,
     "attn_mask has 3 heads"),
    (dict(attn_mask=torch.ones(1, 1, 20, 20, dtype=torch.bool),
          attn_indices=torch.zeros(1, 1, 20, 1, dtype=torch.long)), ValueError, "at most one"),
    (dict(layout="not a layout"), TypeError, "layout must be a SparseLayout"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_gets_a_clear_error(overrides, error, match):
    with pytest.raises(error, match=match):
        call(**overrides)


@pytest.mark.parametrize("bias,error,match", [
    ([0.0], TypeError, "attn_bias must be a torch.Tensor"),
    (torch.zeros(1, 4, 20, 20, dtype=torch.float64), TypeError, "query's dtype"),
    (torch.zeros(1, 3, 20, 20), ValueError, r"attn_bias must have shape \(B\|1, Hq\|Hkv\|1"),
    (torch.zeros(1, 4, 20, 1), ValueError, "got \\(1, 4, 20, 1\\)"),
    (torch.zeros(4, 20, 20), ValueError, "attn_bias must have shape"),
])
def test_bad_attn_bias(bias, error, match):
    with pytest.raises(error, match=match):
        call(attn_bias=bias)


def test_layout_mismatches_are_errors():
    idx = window_indices(20, 5)
    causal = bsa.build_layout(idx, 20, is_causal=True)
    with pytest.raises(ValueError, match="contradicts the layout"):
        call(layout=causal, is_causal=False)
    with pytest.raises(ValueError, match="contradicts the layout"):
        call(layout=bsa.build_layout(idx, 20), is_causal=True)
    with pytest.raises(ValueError, match="q_len=20, k_len=21"):
        call(layout=bsa.build_layout(idx, 21))
    call(layout=causal)  # is_causal left out: the layout decides
    call(layout=causal, is_causal=True)


@pytest.mark.parametrize("block", [(8, 64), (64, 48)])
def test_bad_block_sizes(block):
    with pytest.raises(ValueError, match="block_"):
        bsa.build_layout(window_indices(20, 5), 20, block_m=block[0], block_n=block[1])


def test_build_layout_rejects_bad_k_len_and_non_tensors():
    with pytest.raises(ValueError, match="k_len"):
        bsa.build_layout(window_indices(20, 5), -1)
    with pytest.raises(TypeError, match="attn_indices must be a torch.Tensor"):
        bsa.build_layout([[0]], 20)


def test_one_call_and_layout_paths_agree_and_default_scale():
    q, k, v = qkv()
    idx = window_indices(20, 6).expand(1, 2, -1, -1)
    one_call = bsa.sparse_attn_func(q, k, v, attn_indices=idx, is_causal=True)
    layout = bsa.build_layout(idx, k_len=k.shape[1], is_causal=True)
    out, lse = bsa.sparse_attn_func(q, k, v, layout=layout, return_lse=True)
    torch.testing.assert_close(one_call, out)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (1, 4, 20)
    ref, ref_lse = dense_attention(q, k, v, layout.to_dense_mask(), 1 / math.sqrt(16))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_dense_mask_and_dense_paths():
    q, k, v = qkv(q_len=20, k_len=30)
    mask = torch.rand(1, 4, 20, 30, generator=torch.Generator().manual_seed(3)) < 0.4
    out = bsa.sparse_attn_func(q, k, v, mask)  # positional, as in FSA
    torch.testing.assert_close(out, dense_attention(q, k, v, mask)[0], atol=1e-5, rtol=1e-5)
    out = bsa.sparse_attn_func(q, k, v, is_causal=True)
    from blocksparse_fsa.preprocess import causal_mask
    ref = dense_attention(q, k, v, causal_mask(20, 30, "cpu")[None, None])[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_layout_properties_and_device_move():
    layout = bsa.build_layout(window_indices(100, 30), 100, is_causal=True, block_m=16,
                              block_n=32)
    assert layout.to("cpu") is layout
    assert layout.num_tiles == layout.num_full_tiles + layout.num_partial_tiles
    assert 0 < layout.density <= 1
    assert layout.nnz == int(layout.to_dense_mask().sum())
    assert layout.nbytes == sum(t.numel() * 4 for t in layout._tensors())
    assert "SparseLayout(q_len=100" in repr(layout)


@pytest.mark.parametrize("shape", [(2, 1, 1, 30), (1, 4, 1, 30), (2, 2, 20, 1), (1, 1, 1, 1)],
                         ids=lambda s: "mask" + "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_broadcast_masks_follow_fsa_rules(shape, is_causal):
    """Key-padding (Lq == 1) and query (Lk == 1) masks broadcast without an Lq x Lk copy."""
    q, k, v = qkv(batch=2, q_len=20, k_len=30)
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) < 0.6
    mask.view(-1)[0] = True
    full = mask.expand(2, mask.shape[1], 20, 30)
    layout = bsa.SparseLayout.from_dense_mask(mask, q_len=20, k_len=30, is_causal=is_causal,
                                              block_m=16, block_n=16)
    expected = bsa.SparseLayout.from_dense_mask(full.contiguous()[: mask.shape[0]],
                                                is_causal=is_causal, block_m=16, block_n=16)
    assert torch.equal(layout.to_dense_mask(), expected.to_dense_mask())
    for name in ("full_ptr", "full_col", "part_ptr", "part_col", "masks"):
        assert torch.equal(getattr(layout, name), getattr(expected, name)), name
    out = bsa.sparse_attn_func(q, k, v, mask, is_causal=is_causal)
    ref_mask = expected.to_dense_mask()
    torch.testing.assert_close(out, dense_attention(q, k, v, ref_mask)[0], atol=1e-5, rtol=1e-5)


def test_broadcast_mask_shape_errors():
    with pytest.raises(ValueError, match="attn_mask has 3 query rows"):
        call(attn_mask=torch.ones(1, 1, 3, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected 1 or 30"):
        bsa.SparseLayout.from_dense_mask(torch.ones(1, 1, 1, 7, dtype=torch.bool), q_len=5,
                                         k_len=30)


@pytest.mark.parametrize("softcap", [-1.0, "2", True])
def test_bad_softcap(softcap):
    with pytest.raises(ValueError, match="softcap must be"):
        call(softcap=softcap)


def test_per_call_patterns_build_their_layout_once(monkeypatch):
    """The implicit path caches on the pattern tensor's identity and version."""
    import blocksparse_fsa.attention as attention

    builds = []
    real = attention.build_layout
    monkeypatch.setattr(attention, "build_layout",
                        lambda *a, **kw: builds.append(1) or real(*a, **kw))
    bsa.clear_layout_cache()
    q, k, v = qkv()
    idx = window_indices(20, 5).expand(1, 2, -1, -1).clone()
    first = bsa.sparse_attn_func(q, k, v, attn_indices=idx, is_causal=True)
    for _ in range(3):  # "every layer"
        torch.testing.assert_close(bsa.sparse_attn_func(q, k, v, attn_indices=idx,
                                                        is_causal=True), first)
    assert len(builds) == 1
    bsa.sparse_attn_func(q, k, v, attn_indices=idx, is_causal=False)  # other arguments
    assert len(builds) == 2
    idx[..., 0] = -1  # in place: the cached layout is stale
    changed = bsa.sparse_attn_func(q, k, v, attn_indices=idx, is_causal=True)
    assert len(builds) == 3 and not torch.allclose(changed, first)
    bsa.sparse_attn_func(q, k, v, attn_indices=idx.clone(), is_causal=True)  # another tensor
    assert len(builds) == 4


def test_kernel_choice_is_recorded_on_the_layout():
    """kernel="auto" takes the gather kernels for scattered patterns and the tile walker for
    clustered ones; the choice is a property of the layout, and an override is one call."""
    g = torch.Generator().manual_seed(0)
    scattered = torch.randint(0, 512, (1, 2, 512, 8), generator=g)
    window = torch.arange(512)[:, None] - torch.arange(128)[None, :]
    auto = bsa.build_layout(scattered, 512, is_causal=True)
    assert auto.density < 0.1 and auto.kernel == "gather" and auto.gather_index is not None
    assert "kernel='gather'" in repr(auto) and auto.nbytes > auto.with_kernel("tiles").nbytes
    assert bsa.build_layout(window.clamp(min=-1)[None, None], 512).kernel == "tiles"
    tiles = bsa.build_layout(scattered, 512, is_causal=True, kernel="tiles")
    assert tiles.kernel == "tiles" and tiles.with_kernel("gather").kernel == "gather"
    assert tiles.with_kernel("tiles") is tiles
    assert bsa.build_layout(scattered, 512, reorder="rcm").kernel == "tiles"
    with pytest.raises(ValueError, match="without a token permutation"):
        bsa.build_layout(scattered, 512, reorder="rcm", kernel="gather")
    with pytest.raises(ValueError, match="kernel must be one of"):
        bsa.build_layout(scattered, 512, kernel="fast")
    q, k, v = qkv(q_len=512, k_len=512)
    torch.testing.assert_close(bsa.sparse_attn_func(q, k, v, layout=auto),
                               bsa.sparse_attn_func(q, k, v, layout=tiles), atol=1e-5, rtol=1e-5)
