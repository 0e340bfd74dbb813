"""sparse_attn_varlen_func and sparse_attn_func(window_size=, sinks=) against a float64
reference built from a per-pair oracle of FlashAttention's varlen and window semantics."""

import dataclasses
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import blocksparse_fsa as bsa
from blocksparse_fsa.api import window as window_mod
from blocksparse_fsa.reference import dense_attention

from ..helpers import ATOL, DEVICE, HAS_CUDA, REPO, assert_rule, needs_kernels


def oracle_mask(lens_q, lens_k, left=-1, right=-1, sinks=0, causal=False, local=None):
    """``[heads, total_q, total_k]`` bool (heads: those of ``local``, else 1), pair by pair:
    the semantics written out once, slowly."""
    tq, tk = sum(lens_q), sum(lens_k)
    heads = 1 if local is None else local.shape[0]
    mask = torch.zeros(heads, tq, tk, dtype=torch.bool)
    for h in range(heads):
        q0 = k0 = 0
        for lq, lk in zip(lens_q, lens_k):
            for a in range(lq):
                p = a + lk - lq
                keys = range(lk) if local is None else {int(x) for x in local[h, q0 + a]
                                                        if x >= 0}
                for b in keys:
                    ok = local is not None or ((left < 0 or b >= p - left)
                                               and (right < 0 or b <= p + right)) or b < sinks
                    if causal:
                        ok = ok and b <= p
                    mask[h, q0 + a, k0 + b] = ok
            q0, k0 = q0 + lq, k0 + lk
    return mask


def cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@dataclasses.dataclass
class Case:
    name: str
    lens_q: list
    lens_k: list
    causal: bool = False
    window: tuple = (-1, -1)
    sinks: int = 0
    local_width: int = 0  # > 0: random local attn_indices of this width (with -1, duplicates)
    hq: int = 4
    hkv: int = 2
    dim: int = 16
    softcap: float = 0.0


CASES = [
    Case("docs-causal", [5, 0, 1, 37, 12], [5, 0, 1, 37, 12], causal=True),
    Case("docs-dense-mqa", [9, 1, 30], [9, 1, 30], hq=3, hkv=1),
    Case("lq-ne-lk-causal", [3, 10, 1, 0, 6], [20, 10, 0, 7, 2], causal=True),
    Case("lq-ne-lk", [3, 10, 1, 4], [20, 10, 0, 7], softcap=5.0),
    Case("one-long", [1, 130, 2], [1, 130, 2], causal=True, hq=2),
    Case("window-causal", [40, 3, 70], [40, 3, 70], causal=True, window=(6, 0)),
    Case("window-both", [33, 50], [45, 50], window=(4, 3), dim=32),
    Case("window-sinks", [40, 2, 61], [40, 5, 61], causal=True, window=(5, 0), sinks=3),
    Case("left-unbounded", [30, 41], [30, 41], window=(-1, 2)),
    Case("local-indices", [17, 0, 40, 1], [23, 4, 40, 1], local_width=9),
    Case("local-indices-causal", [17, 35, 1], [17, 40, 1], causal=True, local_width=7, hkv=1,
         hq=2),
]


def inputs(case, gen):
    tq, tk = sum(case.lens_q), sum(case.lens_k)
    q = torch.randn(tq, case.hq, case.dim, generator=gen)
    k = torch.randn(tk, case.hkv, case.dim, generator=gen)
    v = torch.randn(tk, case.hkv, case.dim, generator=gen)
    local = None
    if case.local_width:
        n_k = torch.tensor([lk for lq, lk in zip(case.lens_q, case.lens_k) for _ in range(lq)])
        local = (torch.rand(case.hkv, tq, case.local_width, generator=gen) * (n_k[:, None] + 1)
                 ).long() - 1  # -1 .. Lk_s - 1, with duplicates
        local[..., 0] = local[..., 1]
    return q, k, v, local


def run_case(case, backend, dtype=torch.float32, device=DEVICE):
    gen = torch.Generator().manual_seed(0)
    q, k, v, local = inputs(case, gen)
    mask = oracle_mask(case.lens_q, case.lens_k, *case.window, case.sinks, case.causal, local)
    dout = torch.randn(q.shape, generator=gen)
    dlse = torch.randn(q.shape[1], q.shape[0], generator=gen)
    cq, ck = cu(case.lens_q).to(device), cu(case.lens_k).to(device)
    extra = {}
    if local is not None:
        extra["attn_indices"] = local.to(device)
    elif case.window != (-1, -1):
        extra.update(window_size=case.window, sinks=case.sinks)

    def grads(dt, fn):
        ins = [t.to(dt).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*ins)
        loss = (out.float().cpu() * dout).sum() + (lse.float().cpu().nan_to_num(0, 0, 0)
                                                    * dlse).sum()
        return (out, lse, *torch.autograd.grad(loss, ins))

    def ours(q, k, v):
        return bsa.sparse_attn_varlen_func(
            q.to(device), k.to(device), v.to(device), cq, ck, max(case.lens_q),
            max(case.lens_k), is_causal=case.causal, softcap=case.softcap, return_lse=True,
            backend=backend, **extra)

    def reference(q, k, v):
        out, lse = dense_attention(q[None], k[None], v[None], mask[None],
                                   softcap=case.softcap)
        return out[0], lse[0]

    low, ref, got = grads(dtype, reference), grads(torch.float64, reference), grads(dtype, ours)
    for name, g, lo, r in zip(["out", "lse", "dq", "dk", "dv"], got, low, ref):
        assert g.shape == r.shape, name
        assert_rule(f"{case.name} {name}", g.detach().cpu(), lo, r, ATOL[dtype])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_varlen_torch_path(case):
    run_case(case, "torch", device="cpu")


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_varlen_triton(case):
    run_case(case, "triton")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES + [
    Case("gpu-docs-d128", [300, 1, 700, 0, 29], [300, 1, 700, 0, 29], causal=True, hq=8,
         hkv=2, dim=128),
    Case("gpu-window-sinks-d64", [513, 1000], [600, 1000], causal=True, window=(127, 0),
         sinks=4, dim=64)], ids=lambda c: c.name)
def test_varlen_gpu(case, dtype):
    run_case(case, "auto", dtype, "cuda")


# ---- sparse_attn_func(window_size=, sinks=) --------------------------------------------------
WINDOWS = [((7, 0), 0, True, 70, 70), ((5, 3), 0, False, 50, 90), ((4, 0), 3, True, 90, 60),
           ((-1, 0), 0, False, 33, 66), ((0, -1), 2, False, 65, 40), ((6, 6), 5, True, 64, 64)]


def run_window(window, sinks, causal, q_len, k_len, backend, dtype=torch.float32,
               device=DEVICE):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, q_len, 4, 16, generator=gen)
    k = torch.randn(2, k_len, 2, 16, generator=gen)
    v = torch.randn(2, k_len, 2, 16, generator=gen)
    dout = torch.randn(q.shape, generator=gen)
    mask = oracle_mask([q_len], [k_len], *window, sinks, causal)

    def grads(dt, fn):
        ins = [t.to(dt).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*ins)
        loss = (out.float().cpu() * dout).sum() + lse.float().cpu().nan_to_num(0, 0, 0).sum()
        return (out, lse, *torch.autograd.grad(loss, ins))

    def ours(q, k, v):
        return bsa.sparse_attn_func(q.to(device), k.to(device), v.to(device),
                                    is_causal=causal, window_size=window, sinks=sinks,
                                    return_lse=True, backend=backend)

    def reference(q, k, v):
        return dense_attention(q, k, v, mask[None])

    low, ref, got = grads(dtype, reference), grads(torch.float64, reference), grads(dtype, ours)
    for name, g, lo, r in zip(["out", "lse", "dq", "dk", "dv"], got, low, ref):
        assert_rule(f"window {window} {name}", g.detach().cpu(), lo, r, ATOL[dtype])


@pytest.mark.parametrize("window,sinks,causal,q_len,k_len", WINDOWS)
def test_window_torch_path(window, sinks, causal, q_len, k_len):
    run_window(window, sinks, causal, q_len, k_len, "torch", device="cpu")


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("window,sinks,causal,q_len,k_len", WINDOWS[:4])
def test_window_triton(window, sinks, causal, q_len, k_len):
    run_window(window, sinks, causal, q_len, k_len, "triton")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_window_gpu(dtype):
    run_window((255, 0), 4, True, 1500, 2000, "auto", dtype, "cuda")
    run_window((100, 37), 0, False, 777, 777, "auto", dtype, "cuda")


@pytest.mark.parametrize("window,sinks,causal,q_len,k_len", WINDOWS)
@pytest.mark.parametrize("block", [(16, 32), (64, 64)])
def test_window_layout_equals_the_dense_mask_layout(window, sinks, causal, q_len, k_len, block):
    got = window_mod.window_layout(q_len, k_len, (*window, sinks), causal, "cpu", *block)
    want = bsa.SparseLayout.from_dense_mask(
        oracle_mask([q_len], [k_len], *window, sinks, causal)[None], is_causal=causal,
        block_m=block[0], block_n=block[1])
    for f in ("full_ptr", "full_col", "part_ptr", "part_col", "masks", "full_ptr_t",
              "full_row_t", "part_ptr_t", "part_row_t", "part_mask_t"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert got.nnz == want.nnz and got.is_causal == causal


def test_packed_layout_pairs_stay_in_their_sequence():
    lens_q, lens_k = [3, 0, 50, 1, 20], [9, 4, 50, 0, 33]
    lay = bsa.build_varlen_layout(cu(lens_q), cu(lens_k), window_size=(7, 2), sinks=2,
                                  is_causal=True, block_m=16, block_n=16)
    assert torch.equal(lay.to_dense_mask()[0, 0],
                       oracle_mask(lens_q, lens_k, 7, 2, 2, True)[0])


def test_layouts_are_cached_by_value(monkeypatch):
    window_mod.clear_cache()
    built = []
    real = window_mod.analytic_layout
    monkeypatch.setattr(window_mod, "analytic_layout", lambda *a: built.append(1) or real(*a))
    q = torch.randn(1, 40, 2, 16)
    for _ in range(3):  # a model's layers: one build
        bsa.sparse_attn_func(q, q, q, window_size=(5, 0), is_causal=True, backend="torch")
    assert len(built) == 1
    bsa.sparse_attn_func(q, q, q, window_size=(5, 0), is_causal=False, backend="torch")
    assert len(built) == 2
    x = torch.randn(30, 2, 16)
    offsets = cu([10, 20])
    for _ in range(2):
        bsa.sparse_attn_varlen_func(x, x, x, offsets, offsets.clone(), 20, 20, backend="torch")
    assert len(built) == 3
    offsets[1] = 12  # new content in the same tensor: a new layout, never a stale one
    bsa.sparse_attn_varlen_func(x, x, x, offsets, offsets, 20, 20, backend="torch")
    assert len(built) == 4


def varlen_call(**overrides):
    x = torch.randn(10, 2, 16)
    args = dict(q=x, k=x, v=x, cu_seqlens_q=cu([4, 6]), cu_seqlens_k=cu([4, 6]),
                max_seqlen_q=6, max_seqlen_k=6, backend="torch")
    args.update(overrides)
    return bsa.sparse_attn_varlen_func(**args)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must be non-decreasing"),
    (dict(cu_seqlens_k=cu([4, 3, 3])), ValueError, "cu_seqlens_q has 3 entries but "
     "cu_seqlens_k has 4"),
    (dict(cu_seqlens_q=cu([4, 5])), ValueError, "cu_seqlens_q ends at 9 but q has 10"),
    (dict(cu_seqlens_k=cu([4, 7])), ValueError, "cu_seqlens_k ends at 11 but k has 10"),
    (dict(cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 10.0])), TypeError, "cu_seqlens_q must be int32"),
    (dict(cu_seqlens_k=[0, 4, 10]), TypeError, "cu_seqlens_k must be a torch.Tensor"),
    (dict(cu_seqlens_q=torch.tensor([[0, 4, 10]], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must be 1-D"),
    (dict(max_seqlen_q=5), ValueError, r"max_seqlen_q=5 is smaller than the longest"),
    (dict(max_seqlen_k=None), TypeError, "max_seqlen_k must be an int"),
    (dict(q=torch.randn(1, 10, 2, 16)), ValueError, "q must have shape"),
    (dict(attn_indices=torch.tensor([[[0], [3], [2], [4], [0], [0], [0], [0], [0], [0]]])),
     ValueError, r"attn_indices\[0, 3, 0\] = 4 is outside its sequence"),
    (dict(attn_indices=torch.full((1, 10, 2), -2)), ValueError, "outside its sequence"),
    (dict(attn_indices=torch.zeros(1, 9, 2, dtype=torch.long)), ValueError,
     "attn_indices must have shape"),
    (dict(attn_indices=torch.zeros(1, 10, 2, dtype=torch.long), window_size=(3, 0)),
     ValueError, "attn_indices and window_size/sinks"),
    (dict(window_size=(3,)), TypeError, "window_size must be a pair"),
    (dict(window_size=(-2, 0)), ValueError, "window_size entries"),
    (dict(window_size=(3, 0), sinks=-1), ValueError, "sinks must be"),
    (dict(is_causal=1), TypeError, "is_causal must be a bool"),
    (dict(dropout_p=0.1), ValueError, "dropout_p must be 0"),
    (dict(alibi_slopes=torch.ones(2)), ValueError, "alibi_slopes is not supported"),
    (dict(causal=True, is_causal=True), ValueError, "causal .* or is_causal, not both"),
])
def test_bad_varlen_input_gets_a_clear_error(overrides, error, match):
    with pytest.raises(error, match=match):
        varlen_call(**overrides)


@pytest.mark.parametrize("other", ["attn_indices", "attn_mask", "layout"])
def test_window_with_another_pattern_is_an_error_naming_both(other):
    q = torch.randn(1, 20, 2, 16)
    pattern = {"attn_indices": torch.zeros(1, 1, 20, 1, dtype=torch.long),
               "attn_mask": torch.ones(1, 1, 20, 20, dtype=torch.bool),
               "layout": bsa.SparseLayout.dense(20, 20)}[other]
    with pytest.raises(ValueError, match=f"window_size/sinks and {other}"):
        bsa.sparse_attn_func(q, q, q, window_size=(3, 0), **{other: pattern})


def test_flash_attention_calls_run_unchanged():
    """A flash_attn_varlen_func call, argument for argument (FlashAttention's names)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(30, h, 16, generator=g) for h in (4, 2, 2))
    offsets = cu([10, 20])
    out, lse, probs = bsa.sparse_attn_varlen_func(
        q, k, v, offsets, offsets, 20, 20, 0.0, softmax_scale=0.3, causal=True,
        window_size=(5, 0), softcap=0.0, alibi_slopes=None, deterministic=False,
        return_attn_probs=True, backend="torch")
    want, want_lse = bsa.sparse_attn_varlen_func(
        q, k, v, offsets, offsets, 20, 20, softmax_scale=0.3, is_causal=True,
        window_size=(5, 0), return_lse=True, backend="torch")
    assert probs is None and torch.equal(out, want) and torch.equal(lse, want_lse)


def test_a_given_layout_reads_no_device_offsets():
    """With ``layout=``, device-side ``cu_seqlens`` are not read (on a GPU a read is a host
    sync): offsets on the meta device, which cannot be read at all, work; host offsets are
    still checked."""
    x = torch.randn(30, 2, 16)
    host = cu([10, 20])
    layout = bsa.build_varlen_layout(host, host, window_size=(5, 0), is_causal=True)
    want = bsa.sparse_attn_varlen_func(x, x, x, host, host, 20, 20, window_size=(5, 0),
                                       causal=True, backend="torch")
    meta = host.to("meta")
    got = bsa.sparse_attn_varlen_func(x, x, x, meta, meta, 20, 20, layout=layout,
                                      backend="torch")
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="cu_seqlens_q must be 1-D"):
        bsa.sparse_attn_varlen_func(x, x, x, meta[None], meta, 20, 20, layout=layout)
    with pytest.raises(ValueError, match="max_seqlen_q=5 is smaller"):
        bsa.sparse_attn_varlen_func(x, x, x, host, host, 5, 20, layout=layout)


def test_a_layout_built_here_must_match_the_call():
    """A layout from ``build_varlen_layout`` (or an earlier call) remembers its offsets and
    causality: host offsets or an explicit ``is_causal`` that contradict it are an error, not a
    silently different pattern; left unsaid, ``is_causal`` follows the layout."""
    x = torch.randn(10, 2, 16)
    host = cu([4, 6])
    layout = bsa.build_varlen_layout(host, host, is_causal=True)
    want = bsa.sparse_attn_varlen_func(x, x, x, host, host, 6, 6, causal=True)
    assert torch.equal(bsa.sparse_attn_varlen_func(x, x, x, host, host, 6, 6, layout=layout),
                       want)
    assert torch.equal(bsa.sparse_attn_varlen_func(x, x, x, host, host, 6, 6, layout=layout,
                                                   causal=True), want)
    with pytest.raises(ValueError, match="built with is_causal=True, got is_causal=False"):
        bsa.sparse_attn_varlen_func(x, x, x, host, host, 6, 6, layout=layout, is_causal=False)
    other = cu([7, 3])
    with pytest.raises(ValueError, match=r"built for cu_seqlens_q = \[0, 4, 10\]"):
        bsa.sparse_attn_varlen_func(x, x, x, other, other, 7, 7, layout=layout)
    # a layout from a call with local indices remembers the same way
    idx = torch.zeros(1, 10, 1, dtype=torch.int32)
    bsa.sparse_attn_varlen_func(x, x, x, host, host, 6, 6, attn_indices=idx)
    built = bsa.build_varlen_layout(host, host, attn_indices=idx)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        bsa.sparse_attn_varlen_func(x, x, x, host, cu([5, 5]), 6, 6, layout=built)


def test_indices_are_checked_without_keys_or_queries():
    """No pairs to compute is no reason to accept bad indices."""
    q, none = torch.randn(10, 4, 16), torch.randn(0, 2, 16)
    with pytest.raises(ValueError, match="outside its sequence"):
        bsa.sparse_attn_varlen_func(q, none, none, cu([4, 6]), cu([0, 0]), 6, 0,
                                    attn_indices=torch.full((2, 10, 3), 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="attn_indices must have shape"):
        bsa.sparse_attn_varlen_func(none.new_empty(0, 4, 16), none, none, cu([0]), cu([0]), 0,
                                    0, attn_indices=torch.zeros(2, 3, 1, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_gpu_varlen_calls_without_a_sync():
    """Host offsets (a fresh layout) or ``layout=`` with device offsets: no host sync."""
    x = torch.randn(2000, 4, 64, device="cuda", dtype=torch.bfloat16)
    host = cu([1000, 999, 1])
    layout = bsa.build_varlen_layout(host, host, window_size=(255, 0), is_causal=True,
                                     device="cuda")
    device_offsets = host.cuda()
    want = bsa.sparse_attn_varlen_func(x, x, x, device_offsets, device_offsets, 1000, 1000,
                                       window_size=(255, 0), causal=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fresh = bsa.sparse_attn_varlen_func(x, x, x, host, host, 1000, 1000,
                                            window_size=(200, 0), causal=True)
        given = bsa.sparse_attn_varlen_func(x, x, x, device_offsets, device_offsets, 1000,
                                            1000, layout=layout)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(given, want) and fresh.isfinite().all()


def test_empty_packed_batch():
    x = torch.randn(0, 2, 16)
    out, lse = bsa.sparse_attn_varlen_func(x, x, x, cu([0, 0]), cu([0, 0]), 0, 0,
                                           return_lse=True)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
    q = torch.randn(5, 2, 16, requires_grad=True)
    out, lse = bsa.sparse_attn_varlen_func(q, x, x, cu([5]), cu([0]), 5, 0, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_readme_varlen_snippet_runs_as_pasted(tmp_path):
    """The README's "Packed and padded batches" code (the call, then the same call with a
    layout built once), in a fresh interpreter (CPU: torch path), against the per-sequence
    oracle."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Packed and padded batches"):]
    section = section[:section.index("\n### ")]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))
    assert "layout=" in code
    check = textwrap.dedent("""
        from blocksparse_fsa.reference import dense_attention
        from tests.api.test_varlen import oracle_mask
        lens = [300, 1, 723]
        mask = oracle_mask(lens, lens, 255, 0, 0, True)
        want = dense_attention(q[None].double(), k[None].double(), v[None].double(),
                               mask[None])[0][0]
        assert out.shape == q.shape and (out.double() - want).abs().max() < 1e-4
        """)
    script = tmp_path / "varlen_snippet.py"
    script.write_text(code + check)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
