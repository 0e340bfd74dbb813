"""torch.compile: the kernels are custom ops, so ``layout=`` calls compile with fullgraph=True
and match eager bit for bit; per-call patterns are a graph break with a clear reason."""

import pytest
import torch

import blocksparse_fsa as bsa
from blocksparse_fsa import ops

from ..helpers import DEVICE, HAS_CUDA


def inputs(device="cpu", dtype=torch.float32, batch=1, q_len=80, hq=4, hkv=2, dim=16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, q_len, h, dim, generator=g).to(device, dtype).requires_grad_()
               for h in (hq, hkv, hkv))
    bias = torch.randn(batch, hkv, 1, q_len, generator=g).to(device, dtype).requires_grad_()
    idx = torch.randint(0, q_len, (1, hkv, q_len, 12), generator=g)
    idx[:, :, :, 0] = torch.arange(q_len)  # every row has its diagonal: lse is finite
    return q, k, v, bias, idx.to(device)


def loss_fn(**kwargs):
    def loss(q, k, v, bias):
        out, lse = bsa.sparse_attn_func(q, k, v, attn_bias=bias, return_lse=True, **kwargs)
        return (out.float() ** 2).sum() + lse.sum()
    return loss


def check_compiled(loss, args, backend, tol=0.0):
    """Compiled vs eager: bit for bit with aot_eager (the same kernels and torch ops); inductor
    may fuse the loss's own reduction differently, hence ``tol``."""
    torch._dynamo.reset()
    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    inputs = [a for a in args if a is not None]
    want = loss(*args)
    want_grads = torch.autograd.grad(want, inputs)
    got = compiled(*args)
    got_grads = torch.autograd.grad(got, inputs)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for name, g, w in zip(["dq", "dk", "dv", "dbias"], got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("reorder,softcap,kernel", [(None, 0.0, "tiles"), (None, 5.0, "tiles"),
                                                    ("rcm", 0.0, "tiles"), (None, 0.0, "gather")])
def test_fullgraph_matches_eager(reorder, softcap, kernel):
    q, k, v, bias, idx = inputs()
    layout = bsa.build_layout(idx, q.shape[1], is_causal=True, block_m=16, block_n=16,
                              reorder=reorder, kernel=kernel)
    args = (q, k, v, bias) if kernel == "tiles" else (q, k, v, None)
    check_compiled(loss_fn(layout=layout, softcap=softcap), args, "aot_eager")


def test_one_compiled_function_many_layouts():
    """A new batch brings a new layout (other tile counts): the compiled function follows it."""
    q, k, v, bias, idx = inputs()

    def loss(q, k, v, layout):
        return (bsa.sparse_attn_func(q, k, v, layout=layout) ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for window in (3, 12, 40):
        layout = bsa.build_layout(idx[..., :window], q.shape[1], block_m=16, block_n=16)
        torch.testing.assert_close(compiled(q, k, v, layout), loss(q, k, v, layout), rtol=0,
                                   atol=0)


def test_ops_pass_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of the custom ops (which run
    the kernels: CUDA tensors on a GPU, CPU tensors under the interpreter)."""
    q, k, v, bias, idx = inputs(DEVICE)
    tiles, sizes = ops._flatten(bsa.build_layout(idx, q.shape[1], block_m=16, block_n=16))
    torch.library.opcheck(ops._fwd, (q, k, v, tiles, sizes, 0.25, 0.0, bias))
    q, k, v, bias = (t.detach() for t in (q, k, v, bias))  # no double backward
    out, lse = ops._fwd(q, k, v, tiles, sizes, 0.25, 0.0, bias)
    torch.library.opcheck(ops._bwd, (torch.randn_like(out), q, k, v, out, lse, None, tiles,
                                     sizes, 0.25, 0.0, bias, True))


def test_per_call_pattern_is_a_graph_break():
    q, k, v, bias, idx = inputs()
    loss = loss_fn(attn_indices=idx)
    with pytest.raises(Exception, match="_layout_of_pattern|disable"):
        torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, v, bias)
    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager")  # without fullgraph: it runs
    torch.testing.assert_close(compiled(q, k, v, bias), loss(q, k, v, bias), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inductor_matches_eager_on_gpu(dtype):
    q, k, v, bias, idx = inputs("cuda", dtype, batch=2, q_len=1000, hq=8, hkv=2, dim=64)
    layout = bsa.build_layout(idx, q.shape[1], is_causal=True)
    check_compiled(loss_fn(layout=layout), (q, k, v, bias), "inductor", tol=1e-3)
