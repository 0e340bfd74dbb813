"""FSA-style cases: top-k masks derived from a learned bias, as FSA's equivalence scripts build
them (window sizes below and above Lk, causal and not, D 32..128), through ``attn_mask`` and
through the equivalent ``attn_indices``, with the bias and its gradient, against float64."""

import pytest
import torch

import blocksparse_fsa as bsa
from blocksparse_fsa.preprocess import causal_mask
from blocksparse_fsa.reference import dense_attention

from ..helpers import assert_rule

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}
CASES = [  # batch, q_len, k_len, heads, kv_heads, dim, window, causal, dtype
    (1, 64, 64, 2, 1, 32, 16, False, torch.float32),
    (2, 65, 80, 4, 2, 64, 24, True, torch.float32),
    (1, 48, 40, 2, 2, 128, 64, True, torch.float32),  # window > Lk: every key
    (2, 33, 97, 4, 1, 64, 32, False, torch.float16),
    (1, 80, 80, 2, 2, 96, 100, False, torch.float16),  # window > Lk, not causal
]


def topk_from_bias(bias, window, q_len):
    """FSA's dynamic mask: the ``window`` keys with the largest bias for each query."""
    k_len = bias.shape[-1]
    bias = bias.expand(-1, -1, q_len, -1)
    if window >= k_len:
        idx = torch.arange(k_len).expand(*bias.shape[:3], k_len)
    else:
        idx = bias.topk(window, dim=-1).indices
    mask = torch.zeros(bias.shape, dtype=torch.bool).scatter(-1, idx, True)
    return idx, mask


def case_id(c):
    return "B{}-Lq{}-Lk{}-H{}-Hkv{}-D{}-w{}-{}-{}".format(*c[:7], "causal" if c[7] else "full",
                                                         str(c[8])[6:])


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("bias_rows", ["per_query", "one_row"])
def test_fsa_style_topk_masks(case, bias_rows):
    batch, q_len, k_len, heads, kv_heads, dim, window, causal, dtype = case
    g = torch.Generator().manual_seed(q_len * dim + window)
    q = torch.randn(batch, q_len, heads, dim, generator=g)
    k, v = (torch.randn(batch, k_len, kv_heads, dim, generator=g) for _ in range(2))
    bias = torch.randn(batch, kv_heads, q_len if bias_rows == "per_query" else 1, k_len,
                       generator=g)
    dout = torch.randn(batch, q_len, heads, dim, generator=g)
    idx, mask = topk_from_bias(bias, window, q_len)
    full_mask = mask & causal_mask(q_len, k_len, "cpu") if causal else mask

    def run(dt, fn):
        inputs = [t.to(dt).requires_grad_() for t in (q, k, v, bias)]
        out = fn(*inputs)
        return (out, *torch.autograd.grad((out.float() * dout).sum(), inputs))

    def reference(q, k, v, b):
        return dense_attention(q, k, v, full_mask, bias=b)[0]

    ref = run(torch.float64, reference)
    low = run(dtype, reference)
    for how, pattern in (("attn_mask", dict(attn_mask=mask)), ("attn_indices",
                                                               dict(attn_indices=idx))):
        got = run(dtype, lambda q, k, v, b: bsa.sparse_attn_func(
            q, k, v, attn_bias=b, is_causal=causal, **pattern))
        for name, a, lo, r in zip(["out", "dq", "dk", "dv", "dbias"], got, low, ref):
            assert_rule(f"{how} {name}", a, lo, r, ATOL[dtype])
