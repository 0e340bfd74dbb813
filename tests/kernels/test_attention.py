"""Triton forward and backward against a float64 dense reference (CPU interpreter tier).

Every case checks out, lse, dq, dk and dv with the rule in ``conftest.assert_rule``; outputs
are NaN-poisoned. The same cases run through the pure-PyTorch backend.
"""

from dataclasses import dataclass

import pytest
import torch

import blocksparse_fsa as bsa
from blocksparse_fsa.reference import dense_attention

from ..helpers import ATOL, DEVICE, assert_rule, needs_kernels
from ..helpers import random_indices, window_indices

pytestmark = needs_kernels


@dataclass
class Case:
    batch: int = 2
    q_len: int = 45
    k_len: int = 53
    hq: int = 4
    hkv: int = 2
    dim: int = 24
    pattern: str = "random"  # random | window | messy_window | dense | mask | empty | single
    window: int = 7
    causal: bool = False
    block: tuple = (16, 16)
    pattern_batch: int | None = None  # None = batch
    pattern_heads: int | None = None  # None = hkv
    dtype: torch.dtype = torch.float32
    softcap: float = 0.0
    # bias: "", "full" (B, Hq, Lq, Lk), "kv" (1, Hkv, Lq, Lk), "row" (B, 1, 1, Lk),
    # "kvrow" (B, Hkv, 1, Lk), "qrow" (1, Hq, 1, Lk)
    bias: str = ""
    kernel: str = "tiles"  # attn_indices patterns: "tiles" (the walker) or "gather"

    @property
    def id(self):
        pb = self.batch if self.pattern_batch is None else self.pattern_batch
        ph = self.hkv if self.pattern_heads is None else self.pattern_heads
        return (f"B{self.batch}-Lq{self.q_len}-Lk{self.k_len}-Hq{self.hq}-Hkv{self.hkv}-"
                f"D{self.dim}-{self.pattern}{self.window}-pat{pb}x{ph}-"
                f"{'causal' if self.causal else 'full'}-blk{self.block[0]}x{self.block[1]}-"
                f"{str(self.dtype)[6:]}" + (f"-softcap{self.softcap:g}" if self.softcap else "")
                + (f"-bias_{self.bias}" if self.bias else "")
                + (f"-{self.kernel}" if self.kernel != "tiles" else ""))


CASES = [
    Case(),
    Case(causal=True),
    Case(hq=4, hkv=4, causal=True),  # MHA
    Case(hq=8, hkv=2, dim=16, block=(32, 16)),  # GQA 4
    Case(hq=3, hkv=1, q_len=31, k_len=31, causal=True),  # MQA
    Case(q_len=20, k_len=70, causal=True, block=(16, 32)),  # Lq < Lk
    Case(q_len=70, k_len=20, causal=True),  # Lq > Lk: the first 50 rows are empty
    Case(pattern="window", window=40, q_len=96, k_len=96, causal=True, dim=32),  # full tiles
    Case(pattern="messy_window", window=20, q_len=77, k_len=77),  # duplicates, unsorted
    Case(pattern_batch=1, pattern_heads=1),  # broadcast pattern
    Case(pattern_heads=4, pattern="mask"),  # per query-head dense mask
    Case(hq=4, hkv=2, pattern_heads=4, causal=True),  # per query-head indices
    Case(pattern="mask", causal=True, pattern_batch=1),
    Case(pattern="dense", causal=True, q_len=50, k_len=50),
    Case(pattern="dense", q_len=33, k_len=65, block=(32, 32)),
    Case(pattern="empty"),
    Case(pattern="single", q_len=40, k_len=40),
    Case(batch=1, q_len=130, k_len=130, hq=2, hkv=1, dim=64, window=24, block=(64, 64)),
    Case(batch=1, q_len=37, k_len=41, dim=80, block=(16, 128)),  # D padded to 128
    Case(dtype=torch.float16, causal=True),
    Case(dtype=torch.float16, pattern="window", window=40, q_len=96, k_len=96, dim=64),
    Case(causal=True, softcap=1.5),
    Case(hq=8, hkv=2, dim=16, block=(32, 16), softcap=2.0),  # stacked heads
    Case(dtype=torch.float16, pattern="window", window=40, q_len=96, k_len=96, softcap=3.0),
    Case(causal=True, bias="full"),
    Case(hq=8, hkv=2, dim=16, block=(32, 16), bias="kv", softcap=2.0),  # stacked heads
    Case(pattern="window", window=40, q_len=96, k_len=96, bias="row"),  # key bias, Lq == 1
    Case(dtype=torch.float16, q_len=70, k_len=20, causal=True, bias="row"),
    # one bias row shared by 4 stacked heads (one vector load), and one per stacked head
    Case(batch=2, hq=8, hkv=2, dim=16, block=(32, 16), causal=True, bias="kvrow"),
    Case(hq=8, hkv=2, dim=16, block=(32, 16), q_len=45, bias="qrow"),
    Case(dtype=torch.float16, pattern="mask", pattern_heads=4, bias="full"),
    # the gather kernels through sparse_attn_func (tests/kernels/test_gather.py has the rest)
    Case(hq=8, hkv=2, dim=16, causal=True, kernel="gather"),
    Case(q_len=70, k_len=20, causal=True, softcap=1.5, kernel="gather"),
    Case(pattern="messy_window", window=20, q_len=77, k_len=77, kernel="gather"),
    Case(hq=4, hkv=2, pattern_heads=4, bias="kv", kernel="gather"),  # bias: the walker runs
]


def make_pattern(case: Case, gen):
    """Return sparse_attn_func keyword arguments for the case's pattern."""
    pb = case.batch if case.pattern_batch is None else case.pattern_batch
    ph = case.hkv if case.pattern_heads is None else case.pattern_heads
    shape = (pb, ph, case.q_len, case.window)
    if case.pattern == "random":
        idx = random_indices(shape, case.k_len, seed=case.q_len + case.window)
        idx[:, :, 3] = -1  # an empty row
        return dict(attn_indices=idx)
    if case.pattern in ("window", "messy_window"):
        messy = case.pattern == "messy_window"
        idx = window_indices(case.q_len, case.window, shuffle_seed=0 if messy else None, dup=messy)
        return dict(attn_indices=idx.expand(pb, ph, -1, -1))
    if case.pattern == "mask":
        return dict(attn_mask=torch.rand(pb, ph, case.q_len, case.k_len, generator=gen) < 0.3)
    if case.pattern == "empty":
        return dict(attn_indices=torch.full(shape, -1))
    if case.pattern == "single":
        return dict(attn_indices=torch.randint(0, case.k_len, (pb, ph, case.q_len, 1),
                                               generator=gen))
    assert case.pattern == "dense"
    return {}


def run_case(case: Case, backend: str):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(case.batch, case.q_len, case.hq, case.dim, generator=gen)
    k = torch.randn(case.batch, case.k_len, case.hkv, case.dim, generator=gen)
    v = torch.randn(case.batch, case.k_len, case.hkv, case.dim, generator=gen)
    dout = torch.randn(case.batch, case.q_len, case.hq, case.dim, generator=gen)
    dlse = torch.randn(case.batch, case.hq, case.q_len, generator=gen)
    bias_shape = {"full": (case.batch, case.hq, case.q_len, case.k_len),
                  "kv": (1, case.hkv, case.q_len, case.k_len),
                  "row": (case.batch, 1, 1, case.k_len),
                  "kvrow": (case.batch, case.hkv, 1, case.k_len),
                  "qrow": (1, case.hq, 1, case.k_len)}.get(case.bias)
    bias = torch.randn(bias_shape, generator=gen) if bias_shape else None
    pattern = make_pattern(case, gen)
    block_m, block_n = case.block
    if "attn_indices" in pattern:
        layout = bsa.build_layout(pattern["attn_indices"], case.k_len, is_causal=case.causal,
                                  block_m=block_m, block_n=block_n, kernel=case.kernel)
        assert layout.kernel == case.kernel
        mask = layout.to_dense_mask()
    elif "attn_mask" in pattern:
        layout = bsa.SparseLayout.from_dense_mask(pattern["attn_mask"], is_causal=case.causal,
                                                  block_m=block_m, block_n=block_n)
        mask = layout.to_dense_mask()
    else:
        layout = bsa.SparseLayout.dense(case.q_len, case.k_len, is_causal=case.causal,
                                        block_m=block_m, block_n=block_n)
        mask = layout.to_dense_mask()

    def grads(dtype, fn):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        if bias is not None:
            inputs.append(bias.to(dtype).requires_grad_())
        out, lse = fn(*inputs)
        loss = (out.float() * dout).sum() + (lse.float().nan_to_num(0, 0, 0) * dlse).sum()
        return (out, lse, *torch.autograd.grad(loss, inputs))

    def ours(q, k, v, bias=None):
        return bsa.sparse_attn_func(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE),
                                    layout=layout.to(DEVICE), return_lse=True,
                                    softcap=case.softcap, backend=backend,
                                    attn_bias=None if bias is None else bias.to(DEVICE))

    def reference(q, k, v, bias=None):
        return dense_attention(q, k, v, mask, softcap=case.softcap, bias=bias)

    dt = case.dtype
    low = grads(dt, reference)
    ref = grads(torch.float64, reference)
    got = grads(dt, ours)
    for name, g, lo, r in zip(["out", "lse", "dq", "dk", "dv", "dbias"], got, low, ref):
        assert g.dtype == (torch.float32 if name == "lse" else dt), name
        assert_rule(f"{case.id} {name}", g.cpu(), lo, r, ATOL[dt])
    return got


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_matches_reference(case):
    run_case(case, "triton")


@pytest.mark.parametrize("case", CASES[:8] + CASES[10:16] + CASES[-8:], ids=lambda c: c.id)
def test_torch_backend_matches_reference(case):
    run_case(case, "torch")


@pytest.mark.interpreter
def test_empty_rows_give_zero_output_and_gradients():
    out, lse, dq, dk, dv, dbias = run_case(Case(pattern="empty", bias="full"), "triton")
    assert (out == 0).all() and torch.isneginf(lse).all()
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all() and (dbias == 0).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("kernel", ["tiles", "gather"])
def test_non_contiguous_inputs_from_fused_qkv(kernel):
    gen = torch.Generator().manual_seed(1)
    batch, length, heads, dim = 2, 40, 2, 16
    qkv = torch.randn(batch, length, 3, heads, dim, generator=gen)
    q, k, v = qkv.unbind(2)  # views with a stride of 3 * heads * dim along the sequence
    assert not q.is_contiguous()
    idx = window_indices(length, 9).expand(batch, heads, -1, -1)
    layout = bsa.build_layout(idx, length, is_causal=True, block_m=16, block_n=16, kernel=kernel)
    out = bsa.sparse_attn_func(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), layout=layout.to(DEVICE))
    ref, _ = dense_attention(q.double(), k.double(), v.double(), layout.to_dense_mask())
    low, _ = dense_attention(q, k, v, layout.to_dense_mask())
    assert_rule("out", out.cpu(), low, ref, ATOL[torch.float32])


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=lambda c: c.id)
def test_stacked_dq_programs(case, monkeypatch):
    """dQ can stack the query heads of a GQA group (off by default: slower on an H200)."""
    from blocksparse_fsa.kernels import config

    stack = config.heads_per_program
    monkeypatch.setattr(config, "heads_per_program",
                        lambda bm, g, hd, kernel="fwd": stack(bm, g, hd, "fwd"))
    assert config.heads_per_program(case.block[0], case.hq // case.hkv, case.hq // case.hkv,
                                    "dq") > 1
    run_case(case, "triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [CASES[1], CASES[7], CASES[18]], ids=lambda c: c.id)
def test_pointer_loads_without_tma(case, monkeypatch):
    """``config.TMA = False``: every tile through pointer loads (the interpreter emulates the
    TMA descriptors the other tests read through; GPUs before sm_90 take this path)."""
    from blocksparse_fsa.kernels import common, config

    monkeypatch.setattr(config, "TMA", False)
    assert not common.use_tma(bsa.build_layout(window_indices(8, 2), 8), torch.zeros(1, 8, 1, 16))
    run_case(case, "triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [CASES[7], CASES[25]], ids=lambda c: c.id)
def test_warp_specialized_forward_config(case, monkeypatch):
    """``config.WARP_SPECIALIZE``: the forward launches with 8 warps and the loop option (the
    interpreter ignores both; the sm_90 compile and the GPU tier check what they change)."""
    from blocksparse_fsa.kernels import config

    monkeypatch.setattr(config, "WARP_SPECIALIZE", True)
    assert config.get_fwd_config(case.dim, 64, 64)["warp_specialize"]
    run_case(case, "triton")


def test_poison_outputs_nests_and_restores():
    """The public hook the autouse fixture uses: NaN-filled fresh buffers inside the block."""
    from blocksparse_fsa.kernels import common, poison_outputs

    assert common.outputs_poisoned()  # the autouse fixture
    with poison_outputs(False):
        assert not common.outputs_poisoned()
        with poison_outputs():
            assert common.new_empty(4).isnan().all()
            assert common.new_empty(like=torch.ones(2, 3).t()).isnan().all()
        assert not common.outputs_poisoned()
    assert common.outputs_poisoned()


def test_kernels_take_at_most_40_arguments():
    """Strides travel as one tuple per tensor, optional inputs as None: signatures stay
    readable (the Triton tutorial's forward takes 29)."""
    import inspect

    from blocksparse_fsa.kernels import bwd, fwd, gather

    kernels = [getattr(m, name) for m in (fwd, bwd, gather) for name in dir(m)
               if name.endswith(("_kernel", "_preprocess"))]
    assert len(kernels) == 7
    for kernel in kernels:
        params = inspect.signature(getattr(kernel, "fn", kernel)).parameters
        assert len(params) <= 40, (kernel, len(params))
