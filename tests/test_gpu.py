"""GPU tier (skipped without CUDA): bf16/fp16, real head dims and lengths, determinism, and
addresses past 2**31 elements."""

import pytest
import torch

import blocksparse_fsa as bsa
from blocksparse_fsa.reference import dense_attention

from .helpers import HAS_CUDA, assert_rule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def window_pattern(length, window, heads=1):
    i = torch.arange(length, device="cuda")[:, None]
    idx = i - torch.arange(window, device="cuda")[None, :]
    return torch.where(idx >= 0, idx, -1)[None, None].expand(1, heads, -1, -1)


def random_pattern(length, window, heads, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.randint(0, length, (1, heads, length, window), device="cuda", generator=g)
    return torch.where(torch.rand(idx.shape, device="cuda", generator=g) < 0.1, -1, idx)


def walker_layout(attn_indices, length, **kwargs):
    """A layout for the tile walker (``kernel="auto"`` would give scattered ones to gather)."""
    return bsa.build_layout(attn_indices, length, kernel="tiles", **kwargs)


def check(q, k, v, layout, dtype, softcap=0.0, bias=None):
    """Out, lse and gradients of ours vs fp32 (high) and the same math in ``dtype`` (low)."""
    dout = torch.randn_like(q, dtype=torch.float32)
    mask = layout.to_dense_mask()

    def run(dt, fn):
        inputs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        if bias is not None:
            inputs.append(bias.detach().to(dt).requires_grad_())
        out, lse = fn(*inputs)
        return (out, lse, *torch.autograd.grad((out.float() * dout).sum(), inputs))

    def reference(q, k, v, b=None):
        return dense_attention(q, k, v, mask, softcap=softcap, bias=b)

    def ours(q, k, v, b=None):
        return bsa.sparse_attn_func(q, k, v, layout=layout, return_lse=True, softcap=softcap,
                                    attn_bias=b)

    ref = run(torch.float32, reference)
    low = run(dtype, reference)
    got = run(dtype, ours)
    for name, g, lo, r in zip(["out", "lse", "dq", "dk", "dv", "dbias"], got, low, ref):
        assert_rule(name, g, lo, r, ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dim", [64, 96, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_window_and_random_patterns(dtype, dim, group):
    torch.manual_seed(dim + group)
    hkv, length = 2, 1000
    q = torch.randn(1, length, hkv * group, dim, device="cuda")
    k = torch.randn(1, length, hkv, dim, device="cuda")
    v = torch.randn(1, length, hkv, dim, device="cuda")
    window = walker_layout(window_pattern(length, 200, hkv), length, is_causal=True)
    check(q, k, v, window, dtype)
    scattered = walker_layout(random_pattern(length, 64, hkv), length, is_causal=False)
    check(q, k, v, scattered, dtype)


@pytest.mark.parametrize("length", [4096, 8192])
def test_long_sliding_window_bf16(length):
    torch.manual_seed(length)
    q = torch.randn(1, length, 8, 128, device="cuda")
    k = torch.randn(1, length, 2, 128, device="cuda")
    v = torch.randn(1, length, 2, 128, device="cuda")
    layout = walker_layout(window_pattern(length, 1024, 2), length, is_causal=True)
    check(q, k, v, layout, torch.bfloat16)


def test_dense_causal_and_mask_paths():
    torch.manual_seed(0)
    length = 1500
    q, k, v = (torch.randn(2, length, 4, 64, device="cuda") for _ in range(3))
    check(q, k, v, bsa.SparseLayout.dense(length, length, is_causal=True, device="cuda"),
          torch.bfloat16)
    mask = torch.rand(2, 4, length, length, device="cuda") < 0.05
    check(q, k, v, bsa.SparseLayout.from_dense_mask(mask), torch.bfloat16)


def test_backward_is_bitwise_deterministic():
    """No atomics anywhere: two backward passes give the same bits."""
    torch.manual_seed(0)
    length = 4096
    q = torch.randn(1, length, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, length, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, length, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layout = walker_layout(random_pattern(length, 512, 2), length, is_causal=True)
    dout = torch.randn_like(q)
    first = torch.autograd.grad(bsa.sparse_attn_func(q, k, v, layout=layout), (q, k, v), dout)
    for _ in range(3):
        again = torch.autograd.grad(bsa.sparse_attn_func(q, k, v, layout=layout), (q, k, v), dout)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_addresses_past_2_pow_31_elements():
    """q, out, dout and dq with more than 2**31 elements (int32 offsets would wrap)."""
    length, heads, dim, window = 270_000, 64, 128, 16
    assert length * heads * dim > 2**31
    torch.manual_seed(0)
    q = torch.randn(1, length, heads, dim, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    k = torch.randn(1, length, 1, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, length, 1, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layout = walker_layout(window_pattern(length, window), length, is_causal=True)
    out = bsa.sparse_attn_func(q, k, v, layout=layout)
    dq, = torch.autograd.grad(out, (q,), torch.ones_like(out))
    rows = torch.arange(length - 200, length, device="cuda")  # the far end of the buffers
    tail = slice(length - 200 - window, length)
    qs = q[:, rows].detach().float().requires_grad_()
    i = rows[:, None]
    j = torch.arange(tail.start, tail.stop, device="cuda")[None, :]
    mask = ((j <= i) & (j > i - window))[None, None]
    ref, _ = dense_attention(qs, k[:, tail].detach().float(), v[:, tail].detach().float(), mask)
    torch.testing.assert_close(out[:, rows].float(), ref, atol=2e-2, rtol=2e-2)
    ref_dq, = torch.autograd.grad(ref, (qs,), torch.ones_like(ref))
    torch.testing.assert_close(dq[:, rows].float(), ref_dq, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_softcap(dtype):
    torch.manual_seed(1)
    length = 1500
    q = torch.randn(1, length, 8, 128, device="cuda")
    k, v = (torch.randn(1, length, 2, 128, device="cuda") for _ in range(2))
    layout = walker_layout(window_pattern(length, 300, 2), length, is_causal=True)
    check(q, k, v, layout, dtype, softcap=1.5)


@pytest.mark.parametrize("shape", ["full", "kv_row"])
def test_bias_and_its_gradient(shape):
    torch.manual_seed(2)
    length = 1500
    q = torch.randn(1, length, 8, 128, device="cuda")
    k, v = (torch.randn(1, length, 2, 128, device="cuda") for _ in range(2))
    bias = torch.randn((1, 8, length, length) if shape == "full" else (1, 2, 1, length),
                       device="cuda")
    layout = walker_layout(random_pattern(length, 200, 2), length, is_causal=True)
    check(q, k, v, layout, torch.bfloat16, bias=bias)


def test_reordered_layout_with_bias():
    """A dilated window, permuted into plain windows: the kernels read and write through the
    permutation (outputs and gradients in the caller's order)."""
    torch.manual_seed(3)
    length, dilation = 2000, 4
    i = torch.arange(length, device="cuda")[:, None]
    idx = (i - dilation * torch.arange(128, device="cuda")[None, :])[None, None]
    layout = bsa.build_layout(torch.where(idx >= 0, idx, -1).expand(1, 2, -1, -1), length,
                              is_causal=True, reorder=("dilation", dilation))
    q = torch.randn(1, length, 8, 128, device="cuda")
    k, v = (torch.randn(1, length, 2, 128, device="cuda") for _ in range(2))
    check(q, k, v, layout, torch.bfloat16, bias=torch.randn(1, 2, 1, length, device="cuda"))


@pytest.mark.parametrize("dim", [64, 128])
def test_computed_dilation_order_with_tma(dim):
    """Residue groups of whole tiles: the kernels compute the order and read tiles through
    3-D TMA descriptors (one box per tile of a residue group)."""
    torch.manual_seed(dim)
    length, dilation = 2048, 4
    i = torch.arange(length, device="cuda")[:, None]
    idx = (i - dilation * torch.arange(100, device="cuda")[None, :])[None, None]
    layout = bsa.build_layout(torch.where(idx >= 0, idx, -1).expand(1, 2, -1, -1), length,
                              is_causal=True, reorder=("dilation", dilation))
    assert layout.perm_dilation == dilation
    q = torch.randn(1, length, 8, dim, device="cuda")
    k, v = (torch.randn(1, length, 2, dim, device="cuda") for _ in range(2))
    check(q, k, v, layout, torch.bfloat16)


@pytest.mark.parametrize("dim", [96, 128])
def test_pointer_loads_without_tma(dim, monkeypatch):
    """``config.TMA = False``: every tile through pointer loads (what GPUs before sm_90 and
    misaligned tensors get)."""
    from blocksparse_fsa.kernels import config
    monkeypatch.setattr(config, "TMA", False)
    torch.manual_seed(dim)
    length = 1000
    q = torch.randn(1, length, 8, dim, device="cuda")
    k, v = (torch.randn(1, length, 2, dim, device="cuda") for _ in range(2))
    check(q, k, v, walker_layout(window_pattern(length, 200, 2), length, is_causal=True),
          torch.bfloat16)


@pytest.mark.parametrize("dim", [64, 128, 256])
def test_warp_specialized_forward(dim, monkeypatch):
    """``config.WARP_SPECIALIZE``: the forward's tile loop warp-specialized by Triton (opt-in),
    with a bias and without."""
    from blocksparse_fsa.kernels import config
    monkeypatch.setattr(config, "WARP_SPECIALIZE", True)
    torch.manual_seed(dim)
    length = 1000
    q = torch.randn(1, length, 8, dim, device="cuda")
    k, v = (torch.randn(1, length, 2, dim, device="cuda") for _ in range(2))
    layout = walker_layout(window_pattern(length, 200, 2), length, is_causal=True)
    check(q, k, v, layout, torch.bfloat16)
    check(q, k, v, layout, torch.float16, bias=torch.randn(1, 8, 1, length, device="cuda"))


def test_gpu_side_layout_build_matches_numba():
    """Indices on the GPU build their layout there (method="auto"), tensor for tensor equal to
    the numba layout."""
    names = ["full_ptr", "full_col", "part_ptr", "part_col", "masks", "full_ptr_t",
             "full_row_t", "part_ptr_t", "part_row_t", "part_mask_t"]
    for idx in (window_pattern(4096, 700, 2), random_pattern(3000, 300, 2)):
        on_gpu = bsa.build_layout(idx, idx.shape[2], is_causal=True)
        on_cpu = bsa.build_layout(idx, idx.shape[2], is_causal=True, method="numba")
        assert on_gpu.device.type == "cuda" and on_gpu.nnz == on_cpu.nnz
        for name in names:
            assert torch.equal(getattr(on_gpu, name), getattr(on_cpu, name)), name


# ---- gather kernels (issue #7) ----------------------------------------------------------------
def gather_run(q, k, v, dout, layout, softcap=0.0):
    """Out, lse, dq, dk, dv of the gather kernels, through their launchers."""
    from blocksparse_fsa.layout.gather_index import build_gather_index
    from blocksparse_fsa.kernels import gather_attn_bwd, gather_attn_fwd

    gidx = build_gather_index(layout)
    scale = q.shape[-1] ** -0.5
    out, lse = gather_attn_fwd(q, k, v, gidx, scale, softcap)
    return (out, lse, *gather_attn_bwd(q, k, v, out, lse, dout.to(q.dtype), gidx, scale,
                                       softcap))


def check_gather(q, k, v, layout, dtype, softcap=0.0):
    """``check`` for the gather kernels: vs fp32 (high) and the same math in ``dtype`` (low)."""
    dout = torch.randn_like(q, dtype=torch.float32)
    mask = layout.to_dense_mask()

    def run(dt):
        inputs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out, lse = dense_attention(*inputs, mask, softcap=softcap)
        return (out, lse, *torch.autograd.grad((out.float() * dout).sum(), inputs))

    ref, low = run(torch.float32), run(dtype)
    got = gather_run(*(t.to(dtype) for t in (q, k, v)), dout, layout, softcap)
    for name, g, lo, r in zip(["out", "lse", "dq", "dk", "dv"], got, low, ref):
        assert_rule(f"gather {name}", g, lo, r, ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dim", [64, 96, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gather_random_and_window_patterns(dtype, dim, group):
    torch.manual_seed(dim + group)
    hkv, length = 2, 1000
    q = torch.randn(1, length, hkv * group, dim, device="cuda")
    k = torch.randn(1, length, hkv, dim, device="cuda")
    v = torch.randn(1, length, hkv, dim, device="cuda")
    check_gather(q, k, v, bsa.build_layout(random_pattern(length, 150, hkv), length,
                                           is_causal=True), dtype)
    check_gather(q, k, v, bsa.build_layout(window_pattern(length, 200, hkv), length,
                                           is_causal=True), dtype, softcap=2.0)


def test_gather_backward_is_bitwise_deterministic():
    torch.manual_seed(0)
    length = 4096
    q = torch.randn(1, length, 16, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, length, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, length, 2, 128, device="cuda", dtype=torch.bfloat16)
    layout = bsa.build_layout(random_pattern(length, 512, 2), length, is_causal=True)
    dout = torch.randn_like(q)
    first = gather_run(q, k, v, dout, layout)
    for _ in range(3):
        for a, b in zip(first, gather_run(q, k, v, dout, layout)):
            assert torch.equal(a, b)


def test_gather_addresses_past_2_pow_31_elements():
    """q, out, dout and dq with more than 2**31 elements; dK/dV gathers q rows up there."""
    length, heads, dim, window = 270_000, 64, 128, 16
    torch.manual_seed(0)
    q = torch.randn(1, length, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, length, 1, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, length, 1, dim, device="cuda", dtype=torch.bfloat16)
    layout = bsa.build_layout(window_pattern(length, window), length, is_causal=True)
    out, _, dq, dk, dv = gather_run(q, k, v, torch.ones_like(q), layout)
    rows = torch.arange(length - 200, length, device="cuda")  # the far end of the buffers
    tail = slice(length - 200 - window, length)
    i = rows[:, None]
    j = torch.arange(tail.start, tail.stop, device="cuda")[None, :]
    mask = ((j <= i) & (j > i - window))[None, None]
    inputs = [q[:, rows].float().requires_grad_(), k[:, tail].float().requires_grad_(),
              v[:, tail].float().requires_grad_()]
    ref, _ = dense_attention(*inputs, mask)
    torch.testing.assert_close(out[:, rows].float(), ref, atol=2e-2, rtol=2e-2)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref, inputs, torch.ones_like(ref))
    torch.testing.assert_close(dq[:, rows].float(), ref_dq, atol=5e-2, rtol=5e-2)
    # keys >= length - 200 are seen only by queries in ``rows``: their gradients are complete
    torch.testing.assert_close(dk[:, rows].float(), ref_dk[:, window:], atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(dv[:, rows].float(), ref_dv[:, window:], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("head_split", [2, 8])
def test_gather_dkdv_head_split(head_split, monkeypatch):
    """dK/dV spread over several programs per key (fp32 partial sums): same accuracy, and
    still bitwise deterministic."""
    from blocksparse_fsa.kernels import config

    default = config.get_gather_config
    monkeypatch.setattr(config, "get_gather_config", lambda kernel, d, h: {
        **default(kernel, d, h), **({"head_split": head_split} if kernel == "dkdv" else {})})
    torch.manual_seed(3)
    length = 1000
    q = torch.randn(1, length, 16, 128, device="cuda")
    k, v = (torch.randn(1, length, 2, 128, device="cuda") for _ in range(2))
    layout = bsa.build_layout(random_pattern(length, 150, 2), length, is_causal=True)
    check_gather(q, k, v, layout, torch.bfloat16)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    dout = torch.randn_like(q)
    first, again = gather_run(q, k, v, dout, layout), gather_run(q, k, v, dout, layout)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
