"""Non-finite inputs where the pattern does not look, and biases of -inf or finfo.min.

Garbage (NaN, inf) in K/V rows that no query attends and in the queries of empty rows must
not reach any output or gradient; a row whose every active key has a bias of -inf behaves as
an empty row (out 0, lse -inf, zero gradients); huge finite negative biases do not overflow.
Each case runs the Triton kernels (interpreter or GPU) and the pure-PyTorch path against the
float64 reference on clean inputs, with the rule in ``conftest.assert_rule``.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blocksparse_fsa as bsa
from blocksparse_fsa.reference import dense_attention

from ..helpers import ATOL, DEVICE, HAS_CUDA, INTERPRET, assert_rule, needs_kernels

# inf garbage gives inf * 0 = NaN in score tiles before they are masked: the interpreter's
# numpy warns about those intermediates
pytestmark = [needs_kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]
BACKENDS = ["triton", "torch"]
NAMES = ["out", "lse", "dq", "dk", "dv", "dbias"]
needs_gpu = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU")


def unused(layout, batch, hq, hkv):
    """``(key_unused [B, Hkv, Lk], row_empty [B, Hq, Lq])`` of a layout's pattern."""
    mask = layout.to_dense_mask().cpu()  # [B|1, H, Lq, Lk]
    mask = mask.expand(batch, -1, -1, -1).repeat_interleave(hq // mask.shape[1], 1)
    key_unused = ~mask.view(batch, hkv, hq // hkv, *mask.shape[2:]).any(3).any(2)
    return key_unused, ~mask.any(-1)


def spoil(q, k, v, layout, value):
    """Copies of q, k, v with ``value`` in every K/V row no query attends and in every query of
    an empty row."""
    key_unused, row_empty = unused(layout, q.shape[0], q.shape[2], k.shape[2])
    q, k, v = q.clone(), k.clone(), v.clone()
    for t in (k, v):
        t.transpose(1, 2)[key_unused] = value
    q.transpose(1, 2)[row_empty] = value
    return q, k, v


def check(q, k, v, layout, bias=None, garbage=None, backend="triton", dtype=torch.float32,
          softcap=0.0):
    """Out, lse and gradients of ``sparse_attn_func`` on inputs spoiled with ``garbage`` (see
    ``spoil``), against the float64 reference on the clean inputs, where a bias of -inf is a
    masked-out key (rows left without keys: out 0, lse -inf, zero gradients). As in
    FlashAttention's tests, the reference sees the inputs rounded to ``dtype`` (and an upstream
    gradient that ``dtype`` holds exactly): rounding them is not the kernel's error, and in a
    sum over many rows (a broadcast bias' gradient) it can exceed the low-precision baseline's."""
    gen = torch.Generator().manual_seed(7)
    dout = torch.randn(q.shape, generator=gen).to(dtype).float()
    dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=gen)
    mask = layout.to_dense_mask().cpu()
    ref_bias = bias
    if bias is not None:
        hq = q.shape[2]
        per_head = [t if t.shape[1] in (1, hq) else t.repeat_interleave(hq // t.shape[1], 1)
                    for t in (mask, bias)]
        mask = per_head[0] & ~per_head[1].isneginf()
        ref_bias = bias.masked_fill(bias.isneginf(), 0.0)
    spoiled = spoil(q, k, v, layout, garbage) if garbage is not None else (q, k, v)
    # the upstream gradient of an empty row (whose output is a constant 0) is garbage too
    dout_garbage = torch.zeros(q.shape)
    if garbage is not None:
        dout_garbage.transpose(1, 2)[unused(layout, *q.shape[::2], k.shape[2])[1]] = garbage

    def run(tensors, b, dt, fn, extra=None):
        inputs = [t.to(dt).requires_grad_() for t in tensors]
        if b is not None:
            inputs.append(b.to(dt).requires_grad_())
        out, lse = fn(*inputs)
        loss = (out.float() * dout.to(out.device)).sum() + (
            lse.float().nan_to_num(0, 0, 0) * dlse.to(lse.device)).sum()
        if extra is not None:  # adds ``extra`` to the gradient reaching ``out``
            loss = loss + (out.float() * extra.to(out.device)).sum()
        return [t.detach().cpu() for t in (out, lse, *torch.autograd.grad(loss, inputs))]

    def reference(q, k, v, b=None):
        return dense_attention(q, k, v, mask.to(q.device), softcap=softcap, bias=b)

    def low_reference(q, k, v, b=None):  # the same math at low precision on ours' device
        return reference(*(t.to(DEVICE) for t in (q, k, v)), None if b is None else b.to(DEVICE))

    def ours(q, k, v, b=None):
        return bsa.sparse_attn_func(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE),
                                    layout=layout.to(DEVICE), return_lse=True, softcap=softcap,
                                    backend=backend,
                                    attn_bias=None if b is None else b.to(DEVICE))

    ref = run([t.to(dtype) for t in (q, k, v)], None if ref_bias is None else ref_bias.to(dtype),
              torch.float64, reference)
    low = run((q, k, v), ref_bias, dtype, low_reference)
    got = run(spoiled, bias, dtype, ours, dout_garbage)
    for name, g, lo, r in zip(NAMES, got, low, ref):
        assert_rule(f"{backend} {name}", g, lo, r, ATOL[dtype])
    return got


def inputs(batch, q_len, k_len, hq, hkv, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, q_len, hq, dim, generator=gen),
            torch.randn(batch, k_len, hkv, dim, generator=gen),
            torch.randn(batch, k_len, hkv, dim, generator=gen))


def scattered(batch, heads, q_len, k_len, width, seed=0):
    """Random indices over the even keys below ``k_len - 6`` (so whole partial tiles hold keys
    that nobody attends), about one slot in five unused, and every fifth row empty."""
    gen = torch.Generator().manual_seed(seed)
    idx = 2 * torch.randint(0, (k_len - 6) // 2, (batch, heads, q_len, width), generator=gen)
    idx[torch.rand(idx.shape, generator=gen) < 0.2] = -1
    idx[:, :, ::5] = -1
    return idx


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_first_keys_only_with_garbage_after_them(garbage, backend):
    """The reported case: every query attends keys 0..7, the rest of the tile (and the
    sequence) holds garbage."""
    q, k, v = inputs(1, 40, 40, 2, 1, 16)
    idx = torch.arange(8).expand(1, 1, 40, 8)
    layout = bsa.build_layout(idx, 40, block_m=16, block_n=16, kernel="tiles")
    check(q, k, v, layout, garbage=garbage, backend=backend)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", ["tiles", "gather"])
def test_garbage_in_unattended_keys_and_empty_rows(kernel, backend):
    """NaN in unused keys of partial tiles (K and V) and in the queries of empty rows, GQA 2,
    Lq != Lk, per query-head pattern, causal."""
    q, k, v = inputs(2, 37, 45, 4, 2, 24, seed=1)
    idx = scattered(2, 4, 37, 45, 9, seed=1)
    layout = bsa.build_layout(idx, 45, is_causal=True, block_m=16, block_n=16, kernel=kernel)
    _, dk, dv = check(q, k, v, layout, garbage=float("nan"), backend=backend)[2:5]
    key_unused, _ = unused(layout, 2, 4, 2)
    assert key_unused[..., 1::2].all() and (dk.transpose(1, 2)[key_unused] == 0).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", ["pointer", "select", "branch"])
def test_partial_loads_modes(mode, monkeypatch):
    """Every ``config.PARTIAL_LOADS`` keeps garbage out: scattered tiles (some keys and rows
    unused) and a causal window with empty rows (partial tiles that use every key, read as
    one TMA box under ``"branch"``)."""
    monkeypatch.setattr(bsa.kernels.config, "PARTIAL_LOADS", mode)
    q, k, v = inputs(1, 70, 75, 4, 2, 16, seed=3)
    idx = scattered(1, 2, 70, 75, 9, seed=3)
    check(q, k, v, bsa.build_layout(idx, 75, is_causal=True, block_m=16, block_n=16,
                                    kernel="tiles"), garbage=float("nan"))
    window = (torch.arange(70)[:, None] - torch.arange(20)[None, :]).clamp(min=-1)
    window[::9] = -1
    layout = bsa.build_layout(window.expand(1, 2, -1, -1), 75, block_m=16, block_n=16,
                              kernel="tiles")
    check(q, k, v, layout, garbage=float("nan"))


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_shape", ["full", "row"])
def test_garbage_with_bias_and_softcap(bias_shape, backend):
    """The same with a bias (and its gradient) and a softcap: the walker's other score path."""
    q, k, v = inputs(1, 33, 40, 2, 1, 16, seed=2)
    idx = scattered(1, 1, 33, 40, 7, seed=2)
    layout = bsa.build_layout(idx, 40, block_m=16, block_n=16, kernel="tiles")
    gen = torch.Generator().manual_seed(2)
    bias = torch.randn((1, 2, 33, 40) if bias_shape == "full" else (1, 1, 1, 40), generator=gen)
    dbias = check(q, k, v, layout, bias=bias, garbage=float("nan"), backend=backend,
                  softcap=2.0)[5]
    assert dbias.isfinite().all()


def neg_inf_bias(shape, q_len, value, gen):
    """A random bias with ``value`` on keys 0..15 (the first key tile, full in a dense layout)
    and on random entries; with -inf also on every key of rows 3 and 7. A finite ``value``
    spares key 0, so that every row keeps a finite score (see ``test_rows_with_only_huge_
    biases``)."""
    bias = torch.randn(shape, generator=gen)
    first = 0 if value == float("-inf") else 1
    bias[..., first:16] = value
    if shape[2] == q_len:
        bias[..., first:][torch.rand(bias[..., first:].shape, generator=gen) < 0.2] = value
        if value == float("-inf"):
            bias[..., [3, 7], :] = value
    return bias


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("-inf"), torch.finfo(torch.float32).min],
                         ids=["-inf", "finfo.min"])
@pytest.mark.parametrize("causal, bias_shape", [(False, "full"), (True, "full"), (True, "row")],
                         ids=["full-bias_full", "causal-bias_full", "causal-bias_row"])
def test_very_negative_bias_on_full_tiles(causal, bias_shape, value, backend):
    """A dense layout (the first key tile full for every row): a bias of -inf there used to
    give NaN everywhere; rows whose every key is at -inf are empty rows; finfo.min is finite
    (the reference gives those rows a plain average of v)."""
    q, k, v = inputs(2, 40, 40, 2, 1, 16, seed=3)
    layout = bsa.SparseLayout.dense(40, 40, is_causal=causal, block_m=16, block_n=16)
    gen = torch.Generator().manual_seed(3)
    shape = (2, 2, 40, 40) if bias_shape == "full" else (1, 1, 1, 40)
    out, lse, *grads = check(q, k, v, layout, bias=neg_inf_bias(shape, 40, value, gen),
                             backend=backend)
    if bias_shape == "full" and value == float("-inf"):
        assert (out[:, [3, 7]] == 0).all() and lse[..., [3, 7]].isneginf().all()
        assert (grads[0][:, [3, 7]] == 0).all() and (grads[3][..., [3, 7], :] == 0).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_finfo_min_bias(backend):
    """fp16's finfo.min (-65504) everywhere on some rows: finite, no overflow in the scores."""
    q, k, v = inputs(1, 40, 40, 2, 2, 16, seed=4)
    layout = bsa.SparseLayout.dense(40, 40, is_causal=True, block_m=16, block_n=16)
    gen = torch.Generator().manual_seed(4)
    bias = neg_inf_bias((1, 2, 40, 40), 40, torch.finfo(torch.float16).min, gen)
    check(q, k, v, layout, bias=bias, backend=backend, dtype=torch.float16)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_only_huge_biases(backend):
    """Rows whose every key has a bias of finfo.min: scores and lse keep their magnitude (no
    overflow), the output is the plain average of v like the reference's; the gradients are
    finite (the backward recomputes P from an lse whose digits the bias swamped, as PyTorch's
    logsumexp does: exact gradients need -inf, which masks the keys)."""
    q, k, v = inputs(1, 40, 40, 2, 1, 16, seed=5)
    layout = bsa.SparseLayout.dense(40, 40, is_causal=True, block_m=16, block_n=16)
    bias = torch.randn(1, 2, 40, 40, generator=torch.Generator().manual_seed(5))
    bias[:, :, 20:30] = torch.finfo(torch.float32).min
    ins = [t.to(DEVICE).requires_grad_() for t in (q, k, v, bias)]
    out, lse = bsa.sparse_attn_func(*ins[:3], layout=layout.to(DEVICE), attn_bias=ins[3],
                                    return_lse=True, backend=backend)
    ref_out, ref_lse = dense_attention(q.double(), k.double(), v.double(),
                                       layout.to_dense_mask(), bias=bias.double())
    low_out, low_lse = dense_attention(q, k, v, layout.to_dense_mask(), bias=bias)
    assert_rule("out", out.detach().cpu(), low_out, ref_out, ATOL[torch.float32])
    assert_rule("lse", lse.detach().cpu(), low_lse, ref_lse, ATOL[torch.float32])
    assert lse[:, :, 20:30].max() < -3e38
    grads = torch.autograd.grad((out.sum() + lse.sum()), ins)
    assert all(g.isfinite().all() for g in grads)


@pytest.mark.interpreter
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), backend=st.sampled_from(BACKENDS),
       garbage=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
       bias_kind=st.sampled_from(["", "-inf", "finfo.min"]))
def test_property_garbage_and_negative_biases(data, backend, garbage, bias_kind):
    """Random small shapes and patterns: garbage in every unattended K/V row and empty row's
    query, and a bias with random -inf (or finfo.min) entries, whole rows and key tiles."""
    q_len = data.draw(st.integers(17, 48), label="q_len")
    k_len = data.draw(st.integers(17, 48), label="k_len")
    group = data.draw(st.sampled_from([1, 2]), label="group")
    width = data.draw(st.integers(1, 12), label="width")
    causal = data.draw(st.booleans(), label="causal")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    q, k, v = inputs(1, q_len, k_len, 2 * group, 2, 16, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, k_len, (1, 2, q_len, width), generator=gen)
    idx[torch.rand(idx.shape, generator=gen) < 0.3] = -1
    idx[:, :, torch.rand(q_len, generator=gen) < 0.2] = -1  # empty rows
    layout = bsa.build_layout(idx, k_len, is_causal=causal, block_m=16, block_n=16,
                              kernel="tiles")
    bias = None
    if bias_kind:
        value = float("-inf") if bias_kind == "-inf" else torch.finfo(torch.float32).min
        bias = neg_inf_bias((1, 2 * group, q_len, k_len), q_len, value, gen)
        if bias_kind == "finfo.min":  # a finite score in every row (test_rows_with_only_huge_...)
            mask = layout.to_dense_mask().repeat_interleave(group, 1)
            first = mask.int().argmax(-1, keepdim=True)  # [1, Hq, Lq, 1]
            bias.scatter_(3, first, torch.zeros(first.shape))
    check(q, k, v, layout, bias=bias, garbage=garbage, backend=backend)


# GPU tier: real tile sizes (TMA loads), bf16/fp16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kernel", ["tiles", "gather"])
@pytest.mark.parametrize("garbage", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.gpu
@needs_gpu
def test_gpu_garbage_in_unattended_keys_and_empty_rows(garbage, kernel, dtype):
    q, k, v = inputs(2, 300, 333, 8, 2, 64, seed=5)
    idx = scattered(2, 2, 300, 333, 40, seed=5)
    layout = bsa.build_layout(idx, 333, is_causal=True, kernel=kernel)
    check(q, k, v, layout, garbage=garbage, dtype=dtype)
    window = (torch.arange(300)[:, None] - torch.arange(48)[None, :]).clamp(min=-1)
    window[::7] = -1  # empty rows
    layout = bsa.build_layout(window.expand(2, 2, -1, -1), 333, kernel=kernel)
    check(q, k, v, layout, garbage=garbage, dtype=dtype)


@pytest.mark.parametrize("mode", ["select", "branch"])
@pytest.mark.gpu
@needs_gpu
def test_gpu_partial_loads_modes(mode, monkeypatch):
    """The non-default ``config.PARTIAL_LOADS`` on real tiles (TMA), bf16."""
    monkeypatch.setattr(bsa.kernels.config, "PARTIAL_LOADS", mode)
    test_gpu_garbage_in_unattended_keys_and_empty_rows(float("nan"), "tiles", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("value", ["-inf", "finfo.min"])
@pytest.mark.parametrize("bias_shape", ["full", "row"])
@pytest.mark.gpu
@needs_gpu
def test_gpu_very_negative_bias(bias_shape, value, dtype):
    q, k, v = inputs(1, 256, 256, 4, 2, 128, seed=6)
    gen = torch.Generator().manual_seed(6)
    fill = float("-inf") if value == "-inf" else torch.finfo(dtype).min
    shape = (1, 4, 256, 256) if bias_shape == "full" else (1, 1, 1, 256)
    bias = neg_inf_bias(shape, 256, fill, gen)
    bias[..., 0 if value == "-inf" else 1:64] = fill  # a whole 64-key tile (see neg_inf_bias)
    for causal in (False, True):
        layout = bsa.SparseLayout.dense(256, 256, is_causal=causal)
        check(q, k, v, layout, bias=bias, dtype=dtype)
    idx = scattered(1, 2, 256, 256, 32, seed=6)
    check(q, k, v, bsa.build_layout(idx, 256, kernel="tiles"), bias=bias,
          garbage=float("nan"), dtype=dtype, softcap=5.0)

