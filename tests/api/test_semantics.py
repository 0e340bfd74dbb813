"""Zero-size inputs and layouts that no longer fit their sizes: empty results or clear errors,
never a crash or a memory fault, on both backends."""

import dataclasses

import pytest
import torch

import blocksparse_fsa as bsa

from ..helpers import INTERPRET

# the kernels on CPU tensors under the interpreter; test_gpu_semantics.py is the GPU tier
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="needs TRITON_INTERPRET=1"))]


def tensors(batch, q_len, k_len, hq=4, hkv=2, dim=16):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, q_len, hq, dim, generator=g).requires_grad_()
    k, v = (torch.randn(batch, k_len, hkv, dim, generator=g).requires_grad_() for _ in range(2))
    bias = torch.randn(batch, hkv, q_len, k_len, generator=g).requires_grad_()
    return q, k, v, bias


def patterns(batch, q_len, k_len):
    yield "dense", {}
    yield "indices", {"attn_indices": torch.full((batch, 2, q_len, 3), -1)}
    yield "mask", {"attn_mask": torch.ones(batch, 1, q_len, k_len, dtype=torch.bool)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", [(0, 24, 24), (2, 0, 24), (2, 24, 0), (0, 0, 0)],
                         ids=["B0", "Lq0", "Lk0", "all0"])
def test_zero_sizes_give_empty_rows(sizes, backend):
    """B = 0 and Lq = 0 give empty outputs; Lk = 0 makes every row empty (zeros, lse -inf,
    zero gradients), what FlashAttention's and SDPA's definitions give."""
    batch, q_len, k_len = sizes
    for name, pattern in patterns(*sizes):
        q, k, v, bias = tensors(*sizes)
        out, lse = bsa.sparse_attn_func(q, k, v, attn_bias=bias, return_lse=True,
                                        backend=backend, **pattern)
        assert out.shape == q.shape and out.dtype == q.dtype, name
        assert lse.shape == (batch, 4, q_len) and lse.dtype == torch.float32, name
        assert (out == 0).all() and (lse == float("-inf")).all(), name
        (out.sum() + lse.clamp(min=0).sum()).backward()
        for t in (q, k, v, bias):
            assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all(), name


def test_zero_keys_refuse_indices_that_point_at_keys():
    q, k, v, _ = tensors(1, 8, 0)
    with pytest.raises(ValueError, match="attn_indices must be -1 everywhere"):
        bsa.sparse_attn_func(q, k, v, attn_indices=torch.zeros(1, 2, 8, 1, dtype=torch.long))


def layout_and_inputs():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(-1, 100, (1, 2, 100, 5), generator=g)
    idx[..., 0] = torch.arange(100)
    q, k, v = (torch.randn(1, 100, 2, 16, generator=g) for _ in range(3))
    return bsa.build_layout(idx, 100, block_m=32, block_n=32, kernel="tiles"), q, k, v


def corrupt_last_pointer(layout):
    layout.part_ptr[-1] = 10**6
    return layout


def corrupt_column(layout):
    layout.part_col[0] = 10**6
    return layout


def corrupt_transposed_row(layout):
    layout.part_row_t.data[0] = -5  # through .data: no version bump
    return layout


def corrupt_mask_index(layout):
    layout.part_mask_t[-1] = layout.num_partial_tiles
    return layout


def replace_k_len(layout):
    return dataclasses.replace(layout, k_len=200)


def replace_q_len(layout):
    return dataclasses.replace(layout, q_len=50)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("corrupt,match", [
    (corrupt_last_pointer, "part_ptr must rise from 0 to part_col's length"),
    (corrupt_column, r"part_col must lie in \[0, 4\)"),
    (corrupt_transposed_row, r"part_row_t must lie in \[0, 4\)"),
    (corrupt_mask_index, "part_mask_t must lie in"),
    (replace_k_len, r"full_ptr_t has shape \(9,\), expected \(15,\)"),
    (replace_q_len, r"full_ptr has shape \(9,\), expected \(5,\)"),
])
def test_inconsistent_layouts_are_errors(corrupt, match, backend):
    layout, q, k, v = layout_and_inputs()
    layout = corrupt(layout)
    k, v = (t[:, :layout.k_len].expand(1, layout.k_len, 2, 16) if layout.k_len <= 100
            else torch.randn(1, layout.k_len, 2, 16) for t in (k, v))
    q = q[:, :layout.q_len]
    with pytest.raises(ValueError, match="inconsistent layout: " + match):
        bsa.sparse_attn_func(q, k, v, layout=layout, backend=backend)


def test_debug_mode_checks_every_call():
    layout, q, k, v = layout_and_inputs()
    bsa.set_debug(True)
    try:
        bsa.sparse_attn_func(q, k, v, layout=layout, backend="torch")
        layout.part_col.numpy()[:] = 10**6  # a write no version counter sees
        with pytest.raises(ValueError, match="part_col must lie in"):
            bsa.sparse_attn_func(q, k, v, layout=layout, backend="torch")
    finally:
        bsa.set_debug(False)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        bsa.set_debug("yes")
