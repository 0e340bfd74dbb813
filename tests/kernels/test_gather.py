"""Gather kernels against a float64 dense reference and against the tile walker (CPU interpreter
tier).

Every case checks out, lse, dq, dk and dv with the rule in ``conftest.assert_rule`` (the loss
includes an lse term, so ``dlse`` is exercised); outputs are NaN-poisoned. Patterns come from
``build_layout`` (duplicates, unsorted rows, -1 slots, causality) and reach the kernels through
``build_gather_index``.
"""

import math
from dataclasses import dataclass

import pytest
import torch

import blocksparse_fsa as bsa
from blocksparse_fsa.layout.gather_index import build_gather_index
from blocksparse_fsa.kernels import config
from blocksparse_fsa.kernels.gather import gather_attn_bwd, gather_attn_fwd
from blocksparse_fsa.reference import dense_attention

from ..helpers import ATOL, DEVICE, assert_rule, needs_kernels
from ..helpers import random_indices, window_indices

pytestmark = needs_kernels


@dataclass
class Case:
    batch: int = 2
    q_len: int = 29
    k_len: int = 37
    hq: int = 4
    hkv: int = 2
    dim: int = 40
    pattern: str = "random"  # random | window | messy_window | mask | empty | unused_keys
    window: int = 7
    causal: bool = False
    pattern_batch: int | None = None  # None = batch
    pattern_heads: int | None = None  # None = hkv
    dtype: torch.dtype = torch.float32
    softcap: float = 0.0
    block_n: int | None = None  # gather chunk of the forward and dQ (None = config's)
    dkdv_rows: int | None = None  # rows (queries x heads) per dK/dV step (None = config's)
    head_split: int = 1  # dK/dV programs per (key, KV head)

    @property
    def id(self):
        pb = self.batch if self.pattern_batch is None else self.pattern_batch
        ph = self.hkv if self.pattern_heads is None else self.pattern_heads
        return (f"B{self.batch}-Lq{self.q_len}-Lk{self.k_len}-Hq{self.hq}-Hkv{self.hkv}-"
                f"D{self.dim}-{self.pattern}{self.window}-pat{pb}x{ph}-"
                f"{'causal' if self.causal else 'full'}-{str(self.dtype)[6:]}"
                + (f"-softcap{self.softcap:g}" if self.softcap else "")
                + (f"-bn{self.block_n}" if self.block_n else "")
                + (f"-rows{self.dkdv_rows}" if self.dkdv_rows else "")
                + (f"-split{self.head_split}" if self.head_split > 1 else ""))


CASES = [
    Case(),
    Case(causal=True, dim=16),
    Case(hq=4, hkv=4, causal=True, batch=1),  # MHA: one head per program
    Case(hq=8, hkv=2, dim=16, window=12),  # GQA 4
    Case(hq=3, hkv=1, q_len=31, k_len=31, causal=True),  # MQA, 3 heads padded to 4 / 16 rows
    Case(q_len=13, k_len=50, causal=True),  # Lq < Lk
    Case(q_len=50, k_len=13, causal=True),  # Lq > Lk: the first 37 rows are empty
    Case(pattern="window", window=70, q_len=80, k_len=80, causal=True, dim=64, batch=1),
    Case(pattern="messy_window", window=20, q_len=41, k_len=41),  # duplicates, unsorted
    Case(pattern_batch=1, pattern_heads=1),  # broadcast pattern
    Case(hq=4, hkv=2, pattern_heads=4, causal=True, batch=1),  # a pattern per query head
    Case(hq=4, hkv=1, pattern="mask", causal=True, pattern_batch=1),  # MQA, dense-mask layout
    Case(pattern="empty"),
    Case(pattern="unused_keys", k_len=40),  # keys no query chose: dk = dv = 0 there
    Case(pattern="window", window=36, q_len=37, k_len=37, batch=1, block_n=16, dkdv_rows=8),
    Case(hq=8, hkv=2, dim=16, window=12, head_split=2, causal=True),  # dK/dV partial sums
    Case(hq=4, hkv=1, pattern_heads=4, head_split=4, q_len=19, k_len=23),  # 1 head each
    Case(dtype=torch.float16, causal=True),
    Case(dtype=torch.float16, hq=8, hkv=2, pattern="window", window=30, q_len=40, k_len=40,
         dim=64, batch=1),
    Case(causal=True, softcap=1.5),
    Case(dtype=torch.float16, hq=8, hkv=1, dim=16, softcap=3.0, block_n=16),  # MQA 8
]


def make_layout(case: Case):
    """The case's pattern as a tile layout (64x64 tiles: the gather path ignores them)."""
    pb = case.batch if case.pattern_batch is None else case.pattern_batch
    ph = case.hkv if case.pattern_heads is None else case.pattern_heads
    shape = (pb, ph, case.q_len, case.window)
    build = dict(is_causal=case.causal, block_m=16, block_n=16)
    if case.pattern == "random":
        idx = random_indices(shape, case.k_len, seed=case.q_len + case.window)
        idx[:, :, 3] = -1  # an empty row
    elif case.pattern in ("window", "messy_window"):
        messy = case.pattern == "messy_window"
        idx = window_indices(case.q_len, case.window, shuffle_seed=0 if messy else None,
                             dup=messy).expand(pb, ph, -1, -1)
    elif case.pattern == "empty":
        idx = torch.full(shape, -1)
    elif case.pattern == "unused_keys":  # even keys only, and never the last four
        idx = 2 * random_indices(shape, case.k_len // 2 - 2, seed=1)
        idx[idx < 0] = -1
    else:
        assert case.pattern == "mask"
        gen = torch.Generator().manual_seed(3)
        mask = torch.rand(pb, ph, case.q_len, case.k_len, generator=gen) < 0.3
        return bsa.SparseLayout.from_dense_mask(mask, **build)
    return bsa.build_layout(idx, case.k_len, **build)


def inputs(case: Case, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(case.batch, case.q_len, case.hq, case.dim, generator=gen)
    k = torch.randn(case.batch, case.k_len, case.hkv, case.dim, generator=gen)
    v = torch.randn(case.batch, case.k_len, case.hkv, case.dim, generator=gen)
    dout = torch.randn(case.batch, case.q_len, case.hq, case.dim, generator=gen)
    dlse = torch.randn(case.batch, case.hq, case.q_len, generator=gen)
    return q, k, v, dout, dlse


@pytest.fixture
def chunks(monkeypatch):
    """Set a case's chunk sizes and head split by wrapping ``config.get_gather_config``."""
    default = config.get_gather_config

    def apply(case: Case):
        def patched(kernel, head_dim, heads):
            cfg = dict(default(kernel, head_dim, heads))
            if kernel in ("fwd", "dq") and case.block_n:
                cfg["BLOCK_N"] = case.block_n
            if kernel == "dkdv":
                cfg["ROWS"] = case.dkdv_rows or cfg["ROWS"]
                cfg["head_split"] = case.head_split
            return cfg
        monkeypatch.setattr(config, "get_gather_config", patched)
    return apply


def run_gather(q, k, v, dout, dlse, gidx, case: Case):
    """Forward and backward through the launchers, on DEVICE; results on the CPU."""
    q, k, v, dout, dlse = (t.to(DEVICE) for t in (q, k, v, dout, dlse))
    gidx = gidx.to(DEVICE)
    scale = 1.0 / math.sqrt(case.dim)
    out, lse = gather_attn_fwd(q, k, v, gidx, scale, case.softcap)
    dq, dk, dv = gather_attn_bwd(q, k, v, out, lse, dout.to(q.dtype), gidx, scale, case.softcap,
                                 dlse=dlse)
    return [t.cpu() for t in (out, lse, dq, dk, dv)]


def reference_grads(q, k, v, dout, dlse, mask, dtype, softcap):
    inputs_ = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = dense_attention(*inputs_, mask, softcap=softcap)
    loss = (out.double() * dout).sum() + (lse.double().nan_to_num(0, 0, 0) * dlse).sum()
    return [out, lse, *torch.autograd.grad(loss, inputs_)]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gather_matches_reference(case, chunks):
    chunks(case)
    q, k, v, dout, dlse = inputs(case)
    layout = make_layout(case)
    mask = layout.to_dense_mask()
    got = run_gather(*(t.to(case.dtype) for t in (q, k, v)), dout, dlse,
                     build_gather_index(layout), case)
    low = reference_grads(q, k, v, dout, dlse, mask, case.dtype, case.softcap)
    ref = reference_grads(q, k, v, dout, dlse, mask, torch.float64, case.softcap)
    for name, g, lo, r in zip(["out", "lse", "dq", "dk", "dv"], got, low, ref):
        assert g.dtype == (torch.float32 if name == "lse" else case.dtype), name
        assert_rule(f"{case.id} {name}", g, lo, r, ATOL[case.dtype])
    # exact zeros where the pattern has nothing: empty query rows, keys no query chose
    per_head = mask.expand(case.batch, -1, -1, -1).repeat_interleave(
        case.hq // mask.shape[1], 1)  # [B, Hq, Lq, Lk]
    row_empty = ~per_head.any(-1)  # [B, Hq, Lq]
    key_unused = ~per_head.view(case.batch, case.hkv, -1, case.q_len, case.k_len).any(3).any(2)
    out, lse, dq, dk, dv = got
    assert (out.transpose(1, 2)[row_empty] == 0).all() and lse[row_empty].isneginf().all()
    assert (dq.transpose(1, 2)[row_empty] == 0).all()
    assert (dk.transpose(1, 2)[key_unused] == 0).all()
    assert (dv.transpose(1, 2)[key_unused] == 0).all()
    if case.pattern == "unused_keys":
        assert key_unused[..., 1::2].all() and key_unused[..., -4:].all()


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [CASES[3], CASES[10], CASES[17]], ids=lambda c: c.id)
def test_gather_matches_tile_walker(case, chunks):
    """Both paths compute the same attention: each within the rule of the float64 reference
    on the same inputs (their summation orders differ, so they agree to rounding only)."""
    chunks(case)
    q, k, v, dout, dlse = (t.to(case.dtype) if t.dim() == 4 else t for t in inputs(case, seed=5))
    layout = make_layout(case)
    got = run_gather(q, k, v, dout, dlse, build_gather_index(layout), case)
    inputs_ = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    out, lse = bsa.sparse_attn_func(*inputs_, layout=layout.to(DEVICE), return_lse=True,
                                    softcap=case.softcap, backend="triton")
    loss = ((out.float() * dout.to(DEVICE).float()).sum()
            + (lse.nan_to_num(0, 0, 0) * dlse.to(DEVICE)).sum())
    walker = [t.detach().cpu() for t in (out, lse, *torch.autograd.grad(loss, inputs_))]
    mask = layout.to_dense_mask()
    low = reference_grads(q, k, v, dout, dlse, mask, case.dtype, case.softcap)
    ref = reference_grads(q, k, v, dout, dlse, mask, torch.float64, case.softcap)
    for name, g, w, lo, r in zip(["out", "lse", "dq", "dk", "dv"], got, walker, low, ref):
        assert_rule(f"gather {name}", g, lo, r, ATOL[case.dtype])
        assert_rule(f"walker {name}", w, lo, r, ATOL[case.dtype])


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [CASES[4], CASES[15], CASES[18]], ids=lambda c: c.id)
def test_gather_backward_is_bitwise_deterministic(case, chunks):
    chunks(case)
    q, k, v, dout, dlse = (t.to(case.dtype) if t.dim() == 4 else t for t in inputs(case))
    gidx = build_gather_index(make_layout(case))
    first = run_gather(q, k, v, dout, dlse, gidx, case)
    second = run_gather(q, k, v, dout, dlse, gidx, case)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], first, second):
        assert torch.equal(a, b), name


def test_gather_launchers_check_their_arguments(chunks):
    case = Case(batch=1, q_len=8, k_len=8, head_split=3)
    q, k, v, _, _ = inputs(case)
    gidx = build_gather_index(make_layout(case))
    with pytest.raises(NotImplementedError, match="attn_bias"):
        gather_attn_fwd(q, k, v, gidx, 1.0, bias=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="q_len=8, k_len=8 but the inputs have"):
        gather_attn_fwd(q[:, :7], k, v, gidx, 1.0)
    with pytest.raises(ValueError, match="2 heads; expected 1, 4 or 4"):  # a pattern per KV head
        gather_attn_fwd(q, k.repeat(1, 1, 2, 1), v.repeat(1, 1, 2, 1), gidx, 1.0)
    with pytest.raises(TypeError, match="GatherIndex"):
        gather_attn_fwd(q, k, v, make_layout(case), 1.0)
    chunks(case)
    out, lse = gather_attn_fwd(q, k, v, gidx, 1.0)
    with pytest.raises(ValueError, match="head_split 3 must divide the group size 2"):
        gather_attn_bwd(q, k, v, out, lse, out, gidx, 1.0)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # interpreter
def test_gather_rows_with_very_negative_scores():
    """lse near -240: exp2(s - lse) of a padded chunk slot would overflow to inf (and inf * 0
    = NaN in dQ) unless the slot is masked out of P."""
    case = Case(batch=1, q_len=20, k_len=20, hq=2, hkv=1, dim=16, pattern="window", window=5)
    gen = torch.Generator().manual_seed(4)
    # every key points one way, every query the other; multiples of 1/32, so that every q.k
    # is exact in fp32 whatever the summation order (the error of a score ~ -240 would
    # otherwise be the dot's rounding times 5, different in every BLAS kernel)
    k = 1.0 + torch.randint(-4, 5, (1, 20, 1, 16), generator=gen) / 32
    q = -3.0 - torch.randint(0, 5, (1, 20, 2, 16), generator=gen) / 32
    v, dout = torch.randn(1, 20, 1, 16, generator=gen), torch.randn(1, 20, 2, 16, generator=gen)
    dlse = torch.randn(1, 2, 20, generator=gen)
    layout = make_layout(case)
    scale = 5.0
    q_, k_, v_, dout_, dlse_ = (t.to(DEVICE) for t in (q, k, v, dout, dlse))
    gidx = build_gather_index(layout).to(DEVICE)
    out, lse = gather_attn_fwd(q_, k_, v_, gidx, scale)
    grads = gather_attn_bwd(q_, k_, v_, out, lse, dout_, gidx, scale, dlse=dlse_)
    assert float(lse.max()) < -200
    mask = layout.to_dense_mask()
    ins = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = dense_attention(*ins, mask, scale)
    loss = (ref_out * dout).sum() + (ref_lse.double() * dlse).sum()
    ref = [ref_out, ref_lse, *torch.autograd.grad(loss, ins)]
    low = recompute_from_lse(q, k, v, dout, dlse, mask, scale)
    for name, g, lo, r in zip(["out", "lse", "dq", "dk", "dv"], [out, lse, *grads], low, ref):
        assert_rule(name, g.cpu(), lo, r, ATOL[torch.float32])


def recompute_from_lse(q, k, v, dout, dlse, mask, scale):
    """The kernels' math in PyTorch at the inputs' precision: scores in log2 units, the
    forward's lse as (max + log2(sum)) * ln 2, and a backward that recomputes P as
    exp2(s - lse * log2 e) from that rounded lse (its absolute error grows with |lse|, which
    the dense reference's autograd never rounds). Returns out, lse, dq, dk, dv; ``mask``
    (1|B, 1, Lq, Lk), one KV head."""
    log2e = math.log2(math.e)
    qh, kh, vh, doh = (t.transpose(1, 2) for t in (q, k, v, dout))  # [B, H, L, D]
    s = (qh @ kh.transpose(-1, -2) * (scale * log2e)).masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    lse = (m + torch.log2(torch.exp2(s - m).sum(-1, keepdim=True)))[..., 0] * math.log(2)
    p = torch.exp2(s - (lse * log2e)[..., None])  # [B, Hq, Lq, Lk]
    out = p @ vh
    delta = (doh * out).sum(-1) - dlse
    ds = p * (doh @ vh.transpose(-1, -2) - delta[..., None])
    dq = ds @ kh * scale
    dk = (ds.transpose(-1, -2) @ qh).sum(1, keepdim=True) * scale
    dv = (p.transpose(-1, -2) @ doh).sum(1, keepdim=True)
    return [out.transpose(1, 2), lse, *(t.transpose(1, 2) for t in (dq, dk, dv))]
