"""The layout cache of per-call patterns is decided by content: never stale, whatever wrote the
pattern, and it works under inference mode."""

import pytest
import torch

import blocksparse_fsa as bsa
from blocksparse_fsa.api import attention

from ..helpers import INTERPRET

# the kernels on CPU tensors under the interpreter; test_gpu_semantics.py is the GPU tier
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="needs TRITON_INTERPRET=1"))]


def qkv(q_len=40, hq=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, q_len, hq, dim, generator=g) for _ in range(3)]


def indices(q_len=40, width=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, q_len, (1, 1, q_len, width), generator=g)


def write_numpy(idx, new):
    idx.numpy()[...] = new.numpy()


def write_data(idx, new):
    idx.data[...] = new


def assign_data(idx, new):
    idx.data = new.clone()


def write_shared_storage(idx, new):
    other = torch.empty(0, dtype=idx.dtype).set_(idx.untyped_storage(), 0, idx.shape)
    other.copy_(new)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("write", [write_numpy, write_data, assign_data, write_shared_storage])
def test_writes_that_skip_the_version_counter_never_give_a_stale_layout(write, backend):
    bsa.clear_layout_cache()
    q, k, v = qkv()
    idx, new = indices(seed=1), indices(seed=2)
    before = bsa.sparse_attn_func(q, k, v, attn_indices=idx, backend=backend)
    write(idx, new)
    got = bsa.sparse_attn_func(q, k, v, attn_indices=idx, backend=backend)
    want = bsa.sparse_attn_func(q, k, v, layout=bsa.build_layout(new, 40), backend=backend)
    assert not torch.equal(before, want)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_hit_is_by_content_and_builds_once(monkeypatch):
    builds = []
    real = attention.build_layout
    monkeypatch.setattr(attention, "build_layout",
                        lambda *a, **kw: builds.append(1) or real(*a, **kw))
    bsa.clear_layout_cache()
    q, k, v = qkv()
    idx = indices()
    first = bsa.sparse_attn_func(q, k, v, attn_indices=idx, backend="torch")
    for copy in (idx, idx.clone(), idx.clone()):  # "every layer", another tensor alike
        torch.testing.assert_close(bsa.sparse_attn_func(q, k, v, attn_indices=copy,
                                                        backend="torch"), first)
    assert len(builds) == 1
    bsa.sparse_attn_func(q, k, v, attn_indices=idx, is_causal=True, backend="torch")
    assert len(builds) == 2  # other arguments
    idx[..., 0] = -1
    bsa.sparse_attn_func(q, k, v, attn_indices=idx, backend="torch")
    assert len(builds) == 3  # other content
    bsa.clear_layout_cache()
    bsa.sparse_attn_func(q, k, v, attn_indices=idx, backend="torch")
    assert len(builds) == 4


def test_cached_layout_is_public_and_bounded():
    bsa.clear_layout_cache()
    calls = []
    patterns = [torch.full((3,), i) for i in range(bsa.api.cache.LAYOUT_CACHE_SIZE + 1)]
    for p in patterns:
        assert bsa.cached_layout(p, ("args",), lambda p=p: calls.append(p) or int(p[0])) == p[0]
    assert bsa.cached_layout(patterns[-1], ("args",), lambda: -1) == patterns[-1][0]
    assert bsa.cached_layout(patterns[0], ("args",), lambda: -1) == -1  # evicted
    assert bsa.cached_layout(patterns[-1], ("other",), lambda: -2) == -2  # other args
    with pytest.raises(TypeError, match="pattern must be a torch.Tensor"):
        bsa.cached_layout([1, 2], (), lambda: None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_with_attn_indices(backend):
    """Serving code runs under inference mode; a layout first built there also serves
    training (the cache builds it outside inference mode)."""
    bsa.clear_layout_cache()
    q, k, v = qkv()
    idx = indices()
    with torch.inference_mode():
        idx_inf = idx.clone()
        out = bsa.sparse_attn_func(q, k, v, attn_indices=idx_inf, backend=backend)
        again = bsa.sparse_attn_func(q, k, v, attn_indices=idx_inf, backend=backend)
        dense = bsa.sparse_attn_func(q, k, v, backend=backend)
        mask = bsa.sparse_attn_func(q, k, v, attn_mask=torch.ones(1, 1, 40, 40, dtype=bool),
                                    backend=backend)
    torch.testing.assert_close(mask, dense)
    q.requires_grad_()
    train = bsa.sparse_attn_func(q, k, v, attn_indices=idx, backend=backend)
    train.sum().backward()
    torch.testing.assert_close(out, train.detach(), rtol=0, atol=0)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    assert torch.isfinite(q.grad).all()
