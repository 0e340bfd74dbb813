"""sparse_attn_with_kvcache against a float64 dense oracle, on the PyTorch path and the split-KV
kernel (under the interpreter on CPU): ragged and full caches, appends, paged caches, windows,
sinks, index lists, GQA/MQA, garbage beyond each row's length; and the errors."""

import pytest
import torch

from blocksparse_fsa import sparse_attn_with_kvcache

from ..helpers import (DEVICE, check_kvcache, logical, make_cache, needs_kernels, oracle_mask,
                       kvcache_reference)

BACKENDS = ["torch", pytest.param("triton", marks=needs_kernels)]


CASES = {  # name: (B, Lq, Hq, Hkv, D, L_max, seqlens, n_new, window, sinks)
    "decode-ragged-window": (4, 1, 4, 2, 32, 96, [0, 1, 50, 95], 1, (20, 0), 0),
    "decode-sinks-gqa": (3, 1, 8, 2, 64, 128, [5, 70, 127], 1, (15, -1), 4),
    "decode-mqa-full": (2, 1, 4, 1, 32, 64, [64, 17], 0, (-1, -1), 0),
    "decode-long-window": (2, 1, 2, 2, 16, 64, [10, 40], 1, (100, 0), 2),
    "chunk-prefill": (2, 37, 4, 2, 32, 128, [0, 60], 37, (24, 0), 3),
    "chunk-no-append": (2, 9, 2, 1, 16, 64, [9, 40], 0, (7, 0), 1),
    "mha-d64": (2, 2, 3, 3, 64, 80, [30, 3], 2, (-1, -1), 0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("name", list(CASES))
def test_window_sinks(name, paged, backend):
    batch, q_len, hq, hkv, d, l_max, seqlens, n_new, window, sinks = CASES[name]
    dtype = torch.float32
    base = [s for s in seqlens]
    k_cache, v_cache, table = make_cache(batch, l_max, hkv, d, base, dtype, page=16 if paged
                                         else None)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, q_len, hq, d, generator=g).to(DEVICE)
    k = v = None
    start = torch.tensor([min(s, l_max - n_new) for s in base], dtype=torch.int32)
    if n_new:
        k = torch.randn(batch, n_new, hkv, d, generator=g).to(DEVICE)
        v = torch.randn(batch, n_new, hkv, d, generator=g).to(DEVICE)
    out, lse = sparse_attn_with_kvcache(q, k_cache, v_cache, k, v,
                                        cache_seqlens=start.to(DEVICE), block_table=table,
                                        window_size=window, sinks=sinks, return_lse=True,
                                        backend=backend)
    lengths = (start + n_new).tolist()
    if n_new:  # the append landed where it should
        kl = logical(k_cache, table, batch)
        for b, s in enumerate(start.tolist()):
            assert torch.equal(kl[b, s:s + n_new], k[b])
    mask = oracle_mask(lengths, q_len, l_max, window, sinks)
    check_kvcache(q, out, lse, *kvcache_reference(q, k_cache, v_cache, table, lengths, mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_indices(backend, causal):
    """Index lists with -1, duplicates, unsorted, per KV head; a broadcast batch dim."""
    batch, q_len, hq, hkv, d, l_max = 3, 3, 4, 2, 32, 80
    seqlens = [0, 33, 77]
    k_cache, v_cache, table = make_cache(batch, l_max, hkv, d, seqlens, torch.float32, page=16)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(batch, q_len, hq, d, generator=g).to(DEVICE)
    k = torch.randn(batch, q_len, hkv, d, generator=g).to(DEVICE)
    v = torch.randn(batch, q_len, hkv, d, generator=g).to(DEVICE)
    lengths = [s + q_len for s in seqlens]
    idx = torch.stack([torch.randint(-1, n, (hkv, q_len, 70), generator=g) for n in lengths])
    idx[0, :, :, :] = -1
    idx[0, 0, 1, 5] = 2  # one key for one row
    idx[1, :, :, :10] = 7  # duplicates
    out, lse = sparse_attn_with_kvcache(q, k_cache, v_cache, k, v,
                                        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32,
                                                                   device=DEVICE),
                                        block_table=table, attn_indices=idx.to(DEVICE),
                                        is_causal=causal, return_lse=True, backend=backend)
    mask = oracle_mask(lengths, q_len, l_max, indices=idx, is_causal=causal, num_kv_heads=hkv)
    check_kvcache(q, out, lse, *kvcache_reference(q, k_cache, v_cache, table, lengths, mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_broadcast_softcap(backend):
    batch, q_len, hq, hkv, d, l_max = 2, 1, 4, 1, 16, 48
    seqlens = [48, 20]
    k_cache, v_cache, _ = make_cache(batch, l_max, hkv, d, seqlens, torch.float32)
    q = torch.randn(batch, q_len, hq, d).to(DEVICE)
    idx = torch.tensor([3, -1, 19, 0, 3, 11]).view(1, 1, 1, 6)
    out, lse = sparse_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32,
                                                        device=DEVICE),
        attn_indices=idx.to(DEVICE), softcap=2.0, softmax_scale=0.7, return_lse=True,
        backend=backend)
    mask = oracle_mask(seqlens, q_len, l_max, indices=idx, num_kv_heads=hkv)
    check_kvcache(q, out, lse,
                  *kvcache_reference(q, k_cache, v_cache, None, seqlens, mask, 0.7, 2.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_head_dims(backend, dtype):
    """D 64 / 128 / 256 on the PyTorch path; D 128 and a tiny 256 under the interpreter."""
    dims = (64, 128, 256) if backend == "torch" else (128, 256)
    for d in dims:
        batch, hq, hkv, l_max = 2, 2, 1, 40 if d == 256 else 64
        seqlens = [l_max, 7]
        k_cache, v_cache, _ = make_cache(batch, l_max, hkv, d, seqlens, dtype)
        q = torch.randn(batch, 1, hq, d).to(dtype).to(DEVICE)
        out, lse = sparse_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32,
                                                            device=DEVICE),
            window_size=(30, 0), sinks=2, return_lse=True, backend=backend)
        mask = oracle_mask(seqlens, 1, l_max, (30, 0), 2)
        check_kvcache(q, out, lse, *kvcache_reference(q, k_cache, v_cache, None, seqlens, mask))


@needs_kernels
def test_paged_equals_contiguous_and_backends_agree():
    batch, q_len, hq, hkv, d, l_max = 3, 1, 4, 2, 32, 96
    seqlens = [95, 0, 40]
    outs = []
    for page in (None, 16, 32):
        k_cache, v_cache, table = make_cache(batch, l_max, hkv, d, seqlens, torch.float32,
                                             page=page)
        q = torch.randn(batch, q_len, hq, d, generator=torch.Generator().manual_seed(3))
        kw = dict(cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=DEVICE),
                  block_table=table, window_size=(31, 0), sinks=4, return_lse=True)
        outs.append(sparse_attn_with_kvcache(q.to(DEVICE), k_cache, v_cache, backend="triton",
                                             **kw))
        ref = sparse_attn_with_kvcache(q.to(DEVICE), k_cache, v_cache, backend="torch", **kw)
        torch.testing.assert_close(outs[-1][0].cpu(), ref[0].cpu(), atol=1e-5, rtol=1e-5)
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])


def _args(batch=2, hq=4, hkv=2, d=16, l_max=32, dtype=torch.float32):
    q = torch.randn(batch, 1, hq, d, dtype=dtype)
    kc = torch.zeros(batch, l_max, hkv, d, dtype=dtype)
    return q, kc, kc.clone()


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(cache_seqlens=torch.tensor([31, 33], dtype=torch.int32)), ValueError,
     "cache overflow"),
    (lambda a: a.update(cache_seqlens=torch.tensor([1, -2], dtype=torch.int32)), ValueError,
     "cache_seqlens must be >= 0"),
    (lambda a: a.update(cache_seqlens=torch.tensor([1, 2])), TypeError, "int32"),
    (lambda a: a.update(cache_seqlens=torch.tensor([1], dtype=torch.int32)), ValueError,
     r"shape \(2,\)"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "k_cache"),
    (lambda a: a.update(q=torch.randn(2, 1, 3, 16)), ValueError, "multiple"),
    (lambda a: a.update(k=torch.randn(2, 1, 2, 16)), ValueError, "both k and v"),
    (lambda a: a.update(k=torch.randn(2, 1, 2, 8), v=torch.randn(2, 1, 2, 8)), ValueError,
     r"\(B, L_new, Hkv, D\)"),
    (lambda a: a.update(attn_indices=torch.tensor([[[[0, 9]]]])), ValueError,
     "beyond its row's length"),
    (lambda a: a.update(attn_indices=torch.tensor([[[[0, -3]]]])), ValueError, ">= -1"),
    (lambda a: a.update(attn_indices=torch.tensor([[[[0.0]]]])), TypeError, "attn_indices"),
    (lambda a: a.update(attn_indices=torch.zeros(2, 3, 1, 4, dtype=torch.int32)), ValueError,
     "attn_indices must have shape"),
    (lambda a: a.update(attn_indices=torch.zeros(1, 1, 1, 1, dtype=torch.int32), sinks=2),
     ValueError, "not both"),
    (lambda a: a.update(window_size=(3, -2)), ValueError, "window_size"),
    (lambda a: a.update(sinks=-1), ValueError, "sinks"),
    (lambda a: a.update(softcap=float("nan")), ValueError, "softcap"),
    (lambda a: a.update(softmax_scale="0.5"), TypeError, "softmax_scale"),
    (lambda a: a.update(is_causal=1), TypeError, "is_causal"),
    (lambda a: a.update(backend="cuda"), ValueError, "backend"),
    (lambda a: a.update(return_lse=1), TypeError, "return_lse"),
])
def test_errors(mutate, error, match):
    q, kc, vc = _args()
    args = dict(q=q, k_cache=kc, v_cache=vc, backend="torch",
                cache_seqlens=torch.tensor([3, 5], dtype=torch.int32))
    mutate(args)
    with pytest.raises(error, match=match):
        sparse_attn_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"),
                                 args.pop("k", None), args.pop("v", None), **args)


@pytest.mark.parametrize("mutate, match", [
    (lambda t: t.fill_(0).__setitem__((1, 1), 9), "outside"),
    (lambda t: t.fill_(0).__setitem__((0, 0), -1), "outside"),
])
def test_block_table_errors(mutate, match):
    q, _, _ = _args()
    pages = torch.zeros(4, 16, 2, 16)
    table = torch.zeros(2, 2, dtype=torch.int32)
    mutate(table)
    with pytest.raises(ValueError, match=match):
        sparse_attn_with_kvcache(q, pages, pages, cache_seqlens=torch.tensor(
            [20, 30], dtype=torch.int32), block_table=table, backend="torch")
    with pytest.raises(TypeError, match="block_table must be an int32"):
        sparse_attn_with_kvcache(q, pages, pages, cache_seqlens=3, block_table=table.long())


def test_unused_pages_are_not_checked():
    """Pages past a row's length may hold anything (e.g. -1 in a pool allocator)."""
    q, _, _ = _args()
    pages = torch.randn(4, 16, 2, 16)
    table = torch.tensor([[0, -1], [1, 2]], dtype=torch.int32)
    out = sparse_attn_with_kvcache(q, pages, pages, cache_seqlens=torch.tensor(
        [16, 30], dtype=torch.int32), block_table=table, backend="torch")
    assert torch.isfinite(out).all()


def test_inference_only():
    q, kc, vc = _args()
    with pytest.raises(ValueError, match="inference-only"):
        sparse_attn_with_kvcache(q.requires_grad_(), kc, vc, cache_seqlens=3)
    with torch.inference_mode():
        assert torch.isfinite(sparse_attn_with_kvcache(q, kc, vc, cache_seqlens=3)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["window", "indices"])
def test_garbage_in_unattended_keys(backend, mode):
    """NaN/Inf in keys inside each row's length that no query attends (between the sinks and
    the window, or outside every index list) changes nothing, bit for bit."""
    batch, q_len, hq, hkv, d, l_max = 2, 5, 4, 2, 16, 96
    seqlens = [96, 70]
    clean, clean_v, table = make_cache(batch, l_max, hkv, d, seqlens, torch.float32, page=16)
    q = torch.randn(batch, q_len, hq, d).to(DEVICE)
    lens = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    if mode == "window":
        kw = dict(window_size=(9, 0), sinks=3)
        mask = oracle_mask(seqlens, q_len, l_max, (9, 0), 3)
    else:
        idx = torch.stack([torch.randint(-1, n, (hkv, q_len, 12)) for n in seqlens])
        kw = dict(attn_indices=idx.to(DEVICE))
        mask = oracle_mask(seqlens, q_len, l_max, indices=idx, num_kv_heads=hkv)
    dirty, dirty_v = clean.clone(), clean_v.clone()
    unattended = ~mask.any(2).any(1)  # (B, L_max): keys no query of the row sees
    for b in range(batch):
        for j in unattended[b].nonzero().flatten().tolist():
            page, off = table[b, j // 16].item(), j % 16
            dirty[page, off] = float("nan")
            dirty_v[page, off] = float("inf")
    ref = sparse_attn_with_kvcache(q, clean, clean_v, cache_seqlens=lens, block_table=table,
                                   return_lse=True, backend=backend, **kw)
    out = sparse_attn_with_kvcache(q, dirty, dirty_v, cache_seqlens=lens, block_table=table,
                                   return_lse=True, backend=backend, **kw)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    check_kvcache(q, out[0], out[1],
                  *kvcache_reference(q, clean, clean_v, table, seqlens, mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(5, 3), (-1, 2), (4, -1)], ids=["5-3", "inf-2", "4-inf"])
def test_noncausal_windows(backend, window):
    """Without causality: windows reaching right, and sinks seen by every query (also sinks
    past a query's window on the right)."""
    batch, q_len, hq, hkv, d, l_max = 2, 6, 4, 2, 16, 64
    seqlens = [64, 6]  # row 1: query 0 with window 5-3 sees keys 0-3, and sinks 4, 5
    k_cache, v_cache, _ = make_cache(batch, l_max, hkv, d, seqlens, torch.float32)
    q = torch.randn(batch, q_len, hq, d).to(DEVICE)
    out, lse = sparse_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32,
                                                        device=DEVICE),
        window_size=window, sinks=7, is_causal=False, return_lse=True, backend=backend)
    mask = oracle_mask(seqlens, q_len, l_max, window, 7, is_causal=False)
    check_kvcache(q, out, lse, *kvcache_reference(q, k_cache, v_cache, None, seqlens, mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_small_tensors(backend):
    """Views of ``attn_indices``, ``cache_seqlens`` and ``block_table`` with any strides (a
    selector's (B, Lq, Hkv, W) output permuted, a strided or expanded length, a transposed
    table) give what their contiguous copies give."""
    batch, q_len, hq, hkv, d, l_max = 2, 3, 4, 2, 16, 32
    lens = torch.tensor([12, 20], dtype=torch.int32).to(DEVICE)
    k_cache, v_cache, _ = make_cache(batch, l_max, hkv, d, lens.tolist(), torch.float32, seed=4)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(batch, q_len, hq, d, generator=g).to(DEVICE)
    idx = torch.randint(-1, 12, (batch, q_len, hkv, 6), generator=g).permute(0, 2, 1, 3)

    def run(**kw):
        return sparse_attn_with_kvcache(q, k_cache, v_cache, backend=backend, **kw)

    ref = run(cache_seqlens=lens, attn_indices=idx.contiguous().to(DEVICE))
    assert torch.equal(run(cache_seqlens=lens, attn_indices=idx.to(DEVICE)), ref)
    strided = torch.tensor([12, 0, 20, 0], dtype=torch.int32).to(DEVICE)[::2]
    assert torch.equal(run(cache_seqlens=strided, window_size=(5, 0)),
                       run(cache_seqlens=lens, window_size=(5, 0)))
    same = torch.tensor([9], dtype=torch.int32).to(DEVICE).expand(batch)
    assert torch.equal(run(cache_seqlens=same), run(cache_seqlens=same.contiguous()))
    # the same content in shuffled pages, the table transposed twice (strides (1, B))
    kp, vp, table = make_cache(batch, l_max, hkv, d, lens.tolist(), torch.float32, page=8,
                               seed=4)
    table = table.t().contiguous().t()
    assert table.stride() == (1, batch)
    out = sparse_attn_with_kvcache(q, kp, vp, backend=backend, cache_seqlens=lens,
                                   block_table=table)
    assert torch.equal(out, run(cache_seqlens=lens))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_queries(backend):
    """B = 0 and Lq = 0 give FlashAttention's empty results; new tokens are still appended."""
    q = torch.randn(2, 1, 4, 16).to(DEVICE)
    k_cache = torch.zeros(2, 32, 2, 16).to(DEVICE)
    lens = torch.tensor([5, 9], dtype=torch.int32).to(DEVICE)
    out, lse = sparse_attn_with_kvcache(q[:0], k_cache[:0], k_cache[:0], cache_seqlens=lens[:0],
                                        return_lse=True, backend=backend)
    assert out.shape == (0, 1, 4, 16) and lse.shape == (0, 4, 1)
    new = torch.ones(2, 1, 2, 16).to(DEVICE)
    out, lse = sparse_attn_with_kvcache(q[:, :0], k_cache, k_cache.clone(), new, new,
                                        cache_seqlens=lens, return_lse=True, backend=backend)
    assert out.shape == (2, 0, 4, 16) and lse.shape == (2, 4, 0)
    assert (k_cache[0, 5] == 1).all() and (k_cache[1, 9] == 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_indices_past_int32_are_ignored(backend):
    """With ``check=False``, an int64 entry past every row is ignored (not wrapped to a small
    position); numpy integers are taken for ``window_size`` and ``sinks``."""
    np = pytest.importorskip("numpy")
    q = torch.randn(1, 1, 2, 16).to(DEVICE)
    k_cache, v_cache = torch.randn(1, 16, 1, 16).to(DEVICE), torch.randn(1, 16, 1, 16).to(DEVICE)
    lens = torch.tensor([10], dtype=torch.int32).to(DEVICE)
    idx = torch.tensor([[[[2, 2**32 + 4, -2**32 + 5]]]]).to(DEVICE)
    got = sparse_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, attn_indices=idx,
                                   check=False, backend=backend)
    want = sparse_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, backend=backend,
                                    attn_indices=torch.tensor([[[[2]]]]).to(DEVICE))
    torch.testing.assert_close(got, want)
    a = sparse_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, backend=backend,
                                 window_size=(np.int64(3), np.int32(0)), sinks=np.int64(1))
    b = sparse_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, backend=backend,
                                 window_size=(3, 0), sinks=1)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attention_calls_run_unchanged(backend):
    """A ``flash_attn_with_kvcache`` call, keyword for keyword (FlashAttention's names)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 4, 16, generator=g).to(DEVICE)
    k_cache, v_cache = (torch.randn(2, 40, 2, 16, generator=g).to(DEVICE) for _ in range(2))
    k, v = (torch.randn(2, 3, 2, 16, generator=g).to(DEVICE) for _ in range(2))
    lens = torch.tensor([10, 30], dtype=torch.int32).to(DEVICE)
    ours = sparse_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v,
                                    cache_seqlens=lens, is_causal=True, window_size=(6, 0),
                                    softmax_scale=0.3, return_lse=True, backend=backend)
    theirs = sparse_attn_with_kvcache(
        q, k_cache.clone(), v_cache.clone(), k, v, rotary_cos=None, rotary_sin=None,
        cache_seqlens=lens, cache_batch_idx=None, cache_leftpad=None, block_table=None,
        softmax_scale=0.3, causal=True, window_size=(6, 0), softcap=0.0,
        rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=True,
        backend=backend)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    split = sparse_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v,
                                     cache_seqlens=lens, causal=True, window_size=(6, 0),
                                     softmax_scale=0.3, num_splits=3, backend=backend)
    torch.testing.assert_close(split, ours[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(causal=True, is_causal=True), "causal .* or is_causal, not both"),
    (dict(return_softmax_lse=True, return_lse=True), "not both"),
    (dict(num_splits=-1), "num_splits"),
    (dict(rotary_cos=torch.ones(1)), "rotary_cos is not supported.*rotary embedding"),
    (dict(cache_batch_idx=torch.zeros(2, dtype=torch.int32)), "cache_batch_idx"),
    (dict(cache_leftpad=torch.zeros(2, dtype=torch.int32)), "cache_leftpad"),
    (dict(alibi_slopes=torch.ones(4)), "alibi_slopes"),
])
def test_flash_attention_keywords_we_do_not_serve(kwargs, match):
    q, cache = torch.randn(2, 1, 4, 16), torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match=match):
        sparse_attn_with_kvcache(q, cache, cache, cache_seqlens=4, **kwargs)


def walker_calls(monkeypatch):
    """A list that records the key length of every tile-walker call sparse_attn_with_kvcache
    makes from now on."""
    from blocksparse_fsa.api import kvcache

    walked, walker = [], kvcache.sparse_attn_func
    monkeypatch.setattr(kvcache, "sparse_attn_func",
                        lambda *a, **kw: walked.append(a[1].shape[1]) or walker(*a, **kw))
    return walked


PREFILL_CASES = {  # name: (Lq, seqlens before the append, n_new, window, sinks, causal, how)
    # how: "int" (an int cache_seqlens), "checked" (a tensor, read back by the data check),
    # "unchecked" (a tensor with check=False: nothing known on the host)
    "window-sinks-int": (24, [40, 40], 24, (7, 0), 2, True, "int"),
    "window-checked": (17, [50, 50], 0, (9, 0), 0, True, "checked"),
    "noncausal-window": (12, [30, 30], 12, (5, 3), 3, False, "checked"),
    "dense-longer-than-cache": (9, [3, 3], 2, (-1, -1), 0, True, "int"),
    "ragged": (16, [20, 44], 16, (7, 0), 2, True, "checked"),
    "unchecked": (16, [30, 30], 16, (7, 0), 2, True, "unchecked"),
    # then keywords: MQA, a softcap and a scale, in fp16
    "mqa-softcap-fp16": (20, [33, 33], 20, (11, 0), 1, True, "int",
                         dict(hkv=1, softcap=5.0, scale=0.3, dtype=torch.float16)),
}


@needs_kernels
@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_chunks_through_the_tile_walker(monkeypatch, name):
    """A chunk of new queries over rows of one length the host knows (an int, or the data
    check's read-back) runs the tile walker on the analytic layout over the cache's first keys;
    ragged rows, or lengths only the device knows, stay on the split kernel. Both agree with
    the float64 oracle; garbage past the rows' length is never read."""
    from blocksparse_fsa.kernels import config

    q_len, seqlens, n_new, window, sinks, causal, how, *extra = PREFILL_CASES[name]
    opts = {"hkv": 2, "softcap": 0.0, "scale": None, "dtype": torch.float32,
            **(extra[0] if extra else {})}
    batch, hq, hkv, d, l_max, dtype = 2, 4, opts["hkv"], 16, 80, opts["dtype"]
    monkeypatch.setattr(config, "PREFILL_TILES_MIN_QUERIES", 8)
    walked = walker_calls(monkeypatch)
    k_cache, v_cache, _ = make_cache(batch, l_max, hkv, d, seqlens, dtype)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(batch, n, h, d, generator=g).to(dtype).to(DEVICE)
               for n, h in ((q_len, hq), (n_new, hkv), (n_new, hkv)))
    lens = seqlens[0] if how == "int" else torch.tensor(seqlens, dtype=torch.int32,
                                                          device=DEVICE)
    out, lse = sparse_attn_with_kvcache(q, k_cache, v_cache, k if n_new else None,
                                        v if n_new else None, cache_seqlens=lens,
                                        window_size=window, sinks=sinks, is_causal=causal,
                                        softmax_scale=opts["scale"], softcap=opts["softcap"],
                                        return_lse=True, check=how != "unchecked")
    lengths = [s + n_new for s in seqlens]
    uniform = how != "unchecked" and len(set(lengths)) == 1
    assert walked == ([lengths[0]] if uniform else [])
    mask = oracle_mask(lengths, q_len, l_max, window, sinks, is_causal=causal)
    check_kvcache(q, out, lse, *kvcache_reference(q, k_cache, v_cache, None, lengths, mask,
                                                  opts["scale"], opts["softcap"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_prefill_chunk_walks_tiles(monkeypatch, dtype):
    """A 600-query chunk appended to two rows of 3000 keys (over the default threshold; the
    lengths from the eager check's read-back): the tile walker, within the rule of the float64
    oracle."""
    batch, q_len, hq, hkv, d, l_max, start = 2, 600, 8, 2, 128, 4096, 3000
    walked = walker_calls(monkeypatch)
    k_cache, v_cache, _ = make_cache(batch, l_max, hkv, d, [start] * batch, dtype)
    q = torch.randn(batch, q_len, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(batch, q_len, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    lens = torch.full((batch,), start, dtype=torch.int32, device="cuda")
    out, lse = sparse_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens,
                                        window_size=(1023, 0), sinks=4, return_lse=True)
    lengths = [start + q_len] * batch
    assert walked == [lengths[0]]
    mask = oracle_mask(lengths, q_len, l_max, (1023, 0), 4)
    check_kvcache(q, out, lse, *kvcache_reference(q, k_cache, v_cache, None, lengths, mask))
