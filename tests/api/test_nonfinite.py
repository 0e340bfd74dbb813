"""Non-finite values where the pattern does not look: NaN/Inf in K/V rows no query attends, NaN
in queries that attend nothing, -inf biases (whole rows of them too). Outputs, lse and every
gradient must match the float64 reference computed on cleaned inputs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blocksparse_fsa as bsa
from blocksparse_fsa.reference import dense_attention

from ..helpers import ATOL, INTERPRET, assert_rule

# the Triton kernels run here on CPU tensors: under the interpreter only
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="CPU tensors reach the kernels only under TRITON_INTERPRET=1"))]


@st.composite
def cases(draw):
    batch, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    q_len, k_len = draw(st.integers(1, 70)), draw(st.integers(1, 90))
    width = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    garbage = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return batch, hkv, group, q_len, k_len, width, seed, garbage


def make(batch, hkv, group, q_len, k_len, width, seed, garbage):
    g = torch.Generator().manual_seed(seed)
    hq = hkv * group
    idx = torch.randint(-1, k_len, (batch, hkv, q_len, width), generator=g)
    idx[:, :, torch.randperm(q_len, generator=g)[:max(1, q_len // 5)]] = -1  # empty rows
    mask = torch.zeros(batch, hkv, q_len, k_len + 1, dtype=torch.bool)
    mask.scatter_(3, idx.clamp(min=-1) % (k_len + 1), True)
    mask = mask[..., :k_len]
    q = torch.randn(batch, q_len, hq, 16, generator=g)
    k, v = (torch.randn(batch, k_len, hkv, 16, generator=g) for _ in range(2))
    bias = torch.randn(batch, hq, q_len, k_len, generator=g)
    bias[torch.rand(bias.shape, generator=g) < 0.3] = float("-inf")
    bias[:, :, torch.randperm(q_len, generator=g)[:max(1, q_len // 6)]] = float("-inf")
    unattended = ~mask.any(2).transpose(1, 2)  # [B, Lk, Hkv]
    empty = ~mask.any(3).repeat_interleave(group, 1).transpose(1, 2)  # [B, Lq, Hq]
    dirty = (q.masked_fill(empty[..., None], garbage),
             k.masked_fill(unattended[..., None], garbage),
             v.masked_fill(unattended[..., None], garbage))
    return idx, mask, (q, k, v), dirty, bias


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, deadline=None)
@given(case=cases())
def test_garbage_outside_the_pattern_never_leaks(case, backend):
    idx, mask, clean, dirty, bias = make(*case)
    group = clean[0].shape[2] // clean[1].shape[2]
    ours_in = [t.clone().requires_grad_() for t in (*dirty, bias)]
    out, lse = bsa.sparse_attn_func(*ours_in[:3], attn_bias=ours_in[3], attn_indices=idx,
                                    return_lse=True, backend=backend)
    g = torch.Generator().manual_seed(case[6] + 1)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    live = torch.isfinite(lse)
    grads = torch.autograd.grad((out * dout).sum() + (lse.where(live, 0) * dlse).sum(), ours_in)
    # the reference: garbage replaced by zeros, -inf biases as masked pairs
    full_mask = mask.repeat_interleave(group, 1) & (bias > float("-inf"))
    finite_bias = bias.masked_fill(bias == float("-inf"), 0.0)
    results = {}
    for name, dtype in (("ref", torch.float64), ("lowp", torch.float32)):
        ins = [t.to(dtype).requires_grad_() for t in (*clean, finite_bias)]
        o, l = dense_attention(*ins[:3], full_mask, bias=ins[3])
        gr = torch.autograd.grad((o * dout.to(dtype)).sum()
                                 + (l.where(live, 0) * dlse.to(l.dtype)).sum(), ins)
        results[name] = (o, l, *gr)
    for i, name in enumerate(["out", "lse", "dq", "dk", "dv", "dbias"]):
        ours = (out, lse, *grads)[i]
        assert_rule(name, ours, results["lowp"][i], results["ref"][i], ATOL[torch.float32])
