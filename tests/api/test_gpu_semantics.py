"""GPU tier of the API's semantics (skipped without CUDA): the layout cache by content, inference
mode, zero sizes and inconsistent layouts on CUDA tensors, in bf16 and fp16."""

import dataclasses

import pytest
import torch

import blocksparse_fsa as bsa

from ..helpers import HAS_CUDA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


def inputs(q_len=300, k_len=300, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(2, q_len, 8, 64, generator=g, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, k_len, 2, 64, generator=g, device="cuda", dtype=dtype)
            for _ in range(2))
    idx = torch.randint(-1, max(k_len, 1), (2, 2, q_len, 16), generator=g, device="cuda")
    return q, k, v, idx


@pytest.mark.parametrize("write", ["data", "assign_data", "shared_storage"])
def test_cache_is_never_stale_on_the_gpu(write):
    bsa.clear_layout_cache()
    q, k, v, idx = inputs()
    new = inputs(seed=1)[3]
    before = bsa.sparse_attn_func(q, k, v, attn_indices=idx)
    if write == "data":
        idx.data[...] = new
    elif write == "assign_data":
        idx.data = new.clone()
    else:
        torch.empty(0, dtype=idx.dtype, device="cuda").set_(idx.untyped_storage(), 0,
                                                             idx.shape).copy_(new)
    got = bsa.sparse_attn_func(q, k, v, attn_indices=idx)
    want = bsa.sparse_attn_func(q, k, v, layout=bsa.build_layout(new, 300))
    assert not torch.equal(before, want)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inference_mode_on_the_gpu(dtype):
    bsa.clear_layout_cache()
    q, k, v, idx = inputs(dtype=dtype)
    with torch.inference_mode():
        out = bsa.sparse_attn_func(q, k, v, attn_indices=idx.clone())
    q.requires_grad_()
    train = bsa.sparse_attn_func(q, k, v, attn_indices=idx)
    train.float().sum().backward()
    torch.testing.assert_close(out, train.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("sizes", [(0, 300), (300, 0)], ids=["Lq0", "Lk0"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_zero_sizes_on_the_gpu(sizes, backend):
    q, k, v, _ = inputs(*sizes)
    for t in (q, k, v):
        t.requires_grad_()
    out, lse = bsa.sparse_attn_func(q, k, v, return_lse=True, backend=backend)
    assert out.shape == q.shape and (out == 0).all() and (lse == float("-inf")).all()
    out.float().sum().backward()
    assert all(t.grad is not None and (t.grad == 0).all() for t in (q, k, v))


def test_inconsistent_layouts_on_the_gpu():
    q, k, v, idx = inputs()
    layout = bsa.build_layout(idx, 300, kernel="tiles")
    with pytest.raises(ValueError, match="inconsistent layout"):
        bsa.sparse_attn_func(q[:, :200], k, v, layout=dataclasses.replace(layout, q_len=200))
    bsa.sparse_attn_func(q, k, v, layout=layout)  # checked once, remembered
    bsa.set_debug(True)
    try:
        layout.part_col.data[0] = 10**6  # no version bump: found by the debug mode
        with pytest.raises(ValueError, match="part_col must lie in"):
            bsa.sparse_attn_func(q, k, v, layout=layout)
    finally:
        bsa.set_debug(False)
    torch.cuda.synchronize()


def test_gpu_layouts_are_checked_after_in_place_writes():
    """On the GPU the values are checked once per layout (one sync), and again after any write
    that bumps a version counter."""
    q, k, v, idx = inputs()
    layout = bsa.build_layout(idx, 300, kernel="tiles")
    bsa.sparse_attn_func(q, k, v, layout=layout)
    layout.part_ptr[-1] = 10**6
    with pytest.raises(ValueError, match="part_ptr must rise"):
        bsa.sparse_attn_func(q, k, v, layout=layout)
    layout.part_ptr[-1] = layout.num_partial_tiles
    bsa.sparse_attn_func(q, k, v, layout=layout)
    torch.cuda.synchronize()
