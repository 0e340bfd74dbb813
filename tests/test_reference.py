"""The pure-PyTorch path: O(nnz) memory for scattered patterns, float32 accumulation of every
gradient, -inf biases as empty rows, and torch.compile of layouts without full tiles."""

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import blocksparse_fsa as bsa
from blocksparse_fsa.reference import (PAIR_CHUNK, dense_attention, layout_pairs,
                                       sparse_attention)


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage any op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.nbytes:
                self.nbytes, self.op = t.untyped_storage().nbytes(), func
        return out


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_scattered_pattern_memory_is_linear_in_pairs(grad):
    """64 random keys per query at L=16384 once allocated 8 * Lq * Lk bytes. Here (L=4096) the
    largest allocation must stay far below Lq * Lk bytes: without autograd at the layout's own
    size, the pair indices or one chunk of gathered rows; with it at the gathered rows that
    autograd keeps (nnz * D floats)."""
    length, width, dim = 4096, 32, 16
    g = torch.Generator().manual_seed(0)
    layout = bsa.build_layout(torch.randint(0, length, (1, 1, length, width), generator=g),
                              length, kernel="tiles")
    q, k, v = (torch.randn(1, length, 1, dim, generator=g).requires_grad_(grad)
               for _ in range(3))
    with LargestAllocation() as spy:
        out, _ = sparse_attention(q, k, v, layout, 0.25)
        if grad:
            out.sum().backward()
    if grad:
        bound = max(4 * layout.nnz * dim, layout.nbytes)
    else:
        bound = max(layout.nbytes, 8 * layout.nnz, 4 * min(layout.nnz, PAIR_CHUNK) * dim)
    assert bound < length * length and layout.nnz > PAIR_CHUNK  # the gathers run in chunks
    assert spy.nbytes <= bound, f"{spy.op} allocated {spy.nbytes} bytes, bound {bound}"
    want, _ = dense_attention(q.detach(), k.detach(), v.detach(), layout.to_dense_mask(), 0.25)
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [(16, 16), (32, 64), (64, 32)])
def test_layout_pairs_are_the_dense_mask(block):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(-1, 90, (2, 2, 70, 64), generator=g)
    idx[0, 0, :64, :] = torch.arange(64)  # full tiles too
    layout = bsa.build_layout(idx, 90, block_m=block[0], block_n=block[1], kernel="tiles")
    assert layout.num_full_tiles and layout.num_partial_tiles
    group, query, key = layout_pairs(layout)
    dense = torch.zeros(4, 70, 90, dtype=torch.bool)
    dense[group, query, key] = True
    assert group.numel() == layout.nnz
    assert torch.equal(dense.view(2, 2, 70, 90), layout.to_dense_mask())


@pytest.mark.parametrize("bias_rows", [1, 33])
def test_half_precision_gradients_accumulate_in_float32(bias_rows):
    """Every gradient, the bias' included, is the float32 computation cast back once."""
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(-1, 50, (1, 2, 33, 12), generator=g)
    layout = bsa.build_layout(idx, 50, block_m=16, block_n=16)
    base = [torch.randn(1, n, 2, 16, generator=g).half() for n in (33, 50, 50)]
    base.append(torch.randn(1, 2, bias_rows, 50, generator=g).half())
    dout = torch.randn(1, 33, 2, 16, generator=g).half()
    grads = {}
    for dtype in (torch.float16, torch.float32):
        q, k, v, bias = (t.detach().to(dtype).requires_grad_() for t in base)
        out, _ = sparse_attention(q, k, v, layout, 0.25, 0.0, bias)
        out.backward(dout.to(dtype))
        grads[dtype] = [t.grad for t in (q, k, v, bias)]
    for name, half, single in zip("q k v bias".split(), grads[torch.float16],
                                  grads[torch.float32]):
        assert torch.equal(half, single.half()), name


@pytest.mark.parametrize("bias_value", [float("-inf"), torch.finfo(torch.float64).min])
def test_masked_rows_by_bias(bias_value):
    """A row whose every active key has a -inf bias is an empty row (zeros, lse -inf, zero
    gradients); a finite huge negative bias is an ordinary score and does not overflow."""
    g = torch.Generator().manual_seed(3)
    layout = bsa.SparseLayout.dense(128, 128, block_m=32, block_n=32)
    q, k, v = (torch.randn(1, 128, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.zeros(1, 1, 128, 128, dtype=torch.float64)
    bias[..., :64] = bias_value
    bias[..., 10, :] = bias_value  # row 10: every key at the bias value
    for t in (q, k, v, bias):
        t.requires_grad_()
    out, lse = sparse_attention(q, k, v, layout, 0.25, 0.0, bias)
    if bias_value == float("-inf"):
        want, want_lse = dense_attention(q, k, v, (bias > float("-inf")).expand(1, 2, 128, 128),
                                         0.25)
        assert (out[:, 10] == 0).all() and (lse[..., 10] == float("-inf")).all()
    else:
        want, want_lse = dense_attention(q, k, v, None, 0.25, bias=bias)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    (out.sum() + lse.clamp(min=-1e3).sum()).backward()
    for t in (q, k, v, bias):
        assert torch.isfinite(t.grad).all()
    if bias_value == float("-inf"):
        assert (q.grad[:, 10] == 0).all() and (bias.grad[..., 10, :] == 0).all()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_torch_path_without_full_tiles(backend):
    """A layout with no full tiles once crashed inductor's lowering of the pair enumeration."""
    layout = bsa.patterns.sliding_window(128, left=31, block_m=32, block_n=32)
    assert layout.num_full_tiles == 0
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 128, 2, 16, generator=g) for _ in range(3))

    def attend(q, k, v):
        return bsa.sparse_attn_func(q, k, v, layout=layout, backend="torch")

    torch._dynamo.reset()
    got = torch.compile(attend, backend=backend, fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, attend(q, k, v), rtol=1e-5, atol=1e-6)
