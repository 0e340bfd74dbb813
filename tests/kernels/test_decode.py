"""The split-KV decode kernel: any number of splits gives the oracle's answer, a call is
bit-for-bit repeatable, and (on a GPU) bf16/fp16 at serving sizes and 16 decode steps
captured in one CUDA graph match eager execution."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blocksparse_fsa import sparse_attn_with_kvcache
from blocksparse_fsa.kernels import config
from blocksparse_fsa.kernels.decode import decode_fwd

from ..helpers import (DEVICE, HAS_CUDA, REPO, check_kvcache, kvcache_reference, make_cache,
                       needs_kernels, oracle_mask)

needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(params=["kernel", "ticket"])
def merge(request, monkeypatch):
    """Both ways of merging the splits (``config.DECODE_MERGE``)."""
    monkeypatch.setattr(config, "DECODE_MERGE", request.param)
    return request.param


@needs_kernels
@pytest.mark.parametrize("mode", ["window", "indices"])
def test_splits_agree_and_repeat(mode, merge):
    batch, q_len, hq, hkv, d, l_max = 2, 2, 4, 2, 32, 160
    seqlens = [160, 57]
    k_cache, v_cache, table = make_cache(batch, l_max, hkv, d, seqlens, torch.float32, page=32)
    q = torch.randn(batch, q_len, hq, d).to(DEVICE)
    lens = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    kw = dict(block_table=table, softmax_scale=0.2)
    if mode == "window":
        kw.update(window_size=(90, 0), sinks=3)
        mask = oracle_mask(seqlens, q_len, l_max, (90, 0), 3)
    else:
        idx = torch.stack([torch.randint(-1, n, (hkv, q_len, 100)) for n in seqlens])
        kw.update(attn_indices=torch.sort(idx.int(), dim=-1).values.to(DEVICE))
        mask = oracle_mask(seqlens, q_len, l_max, indices=idx, num_kv_heads=hkv)
    hi, lo = kvcache_reference(q, k_cache, v_cache, table, seqlens, mask, 0.2)
    for splits in (1, 2, 5):
        out, lse = decode_fwd(q, k_cache, v_cache, lens, num_splits=splits, **kw)
        check_kvcache(q, out, lse, hi, lo)
        again = decode_fwd(q, k_cache, v_cache, lens, num_splits=splits, **kw)
        assert torch.equal(out, again[0]) and torch.equal(lse, again[1])
        config.DECODE_MERGE = "kernel" if merge == "ticket" else "ticket"
        other = decode_fwd(q, k_cache, v_cache, lens, num_splits=splits, **kw)
        config.DECODE_MERGE = merge
        assert torch.equal(out, other[0]) and torch.equal(lse, other[1])  # the same arithmetic


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("mode", ["window", "indices", "prefill"])
@pytest.mark.gpu
@needs_gpu
def test_gpu_serving_sizes(mode, paged, dtype):
    batch, hq, hkv, d, l_max = 3, 32, 8, 128, 4096
    q_len = 130 if mode == "prefill" else 1
    seqlens = [4096 - q_len, 1000, 0]
    k_cache, v_cache, table = make_cache(batch, l_max, hkv, d, seqlens, dtype,
                                         page=256 if paged else None)
    q = torch.randn(batch, q_len, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(batch, q_len, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    lens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    lengths = [s + q_len for s in seqlens]
    if mode == "indices":
        idx = torch.stack([torch.randint(-1, n, (hkv, q_len, 512)) for n in lengths])
        kw = dict(attn_indices=idx.cuda())
        mask = oracle_mask(lengths, q_len, l_max, indices=idx, num_kv_heads=hkv)
    else:
        kw = dict(window_size=(1023, 0), sinks=4)
        mask = oracle_mask(lengths, q_len, l_max, (1023, 0), 4)
    out, lse = sparse_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens,
                                        block_table=table, return_lse=True, **kw)
    check_kvcache(q, out, lse, *kvcache_reference(q, k_cache, v_cache, table, lengths, mask))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("mode", ["window", "indices"])
@pytest.mark.gpu
@needs_gpu
def test_gpu_cuda_graph_16_steps(mode, paged, merge):
    """16 decode steps (append + attend + advance the lengths) captured once and replayed
    match the same steps run eagerly, bit for bit."""
    batch, hq, hkv, d, l_max, steps = 4, 16, 4, 128, 2048, 16
    seqlens = [0, 100, 1500, l_max - steps]
    k0, v0, table = make_cache(batch, l_max, hkv, d, seqlens, torch.bfloat16,
                               page=128 if paged else None)
    g = torch.Generator(device="cuda").manual_seed(0)
    qs = torch.randn(steps, batch, 1, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    ks = torch.randn(steps, batch, 1, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    vs = torch.randn_like(ks)
    idx = torch.randint(-1, 1 << 20, (steps, batch, hkv, 1, 256), device="cuda", generator=g)
    lens0 = torch.tensor(seqlens, dtype=torch.int32, device="cuda")

    def run(k_cache, v_cache, lens, q, k, v, step_idx, outs):
        for i in range(steps):
            q.copy_(qs[i])
            k.copy_(ks[i])
            v.copy_(vs[i])
            kw = dict(window_size=(511, 0), sinks=4) if mode == "window" else dict(
                attn_indices=step_idx[i] % (lens + 1).view(-1, 1, 1, 1))
            outs[i].copy_(sparse_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens,
                                                   block_table=table, check=False, **kw))
            lens += 1

    def state():
        return (k0.clone(), v0.clone(), lens0.clone(), torch.empty_like(qs[0]),
                torch.empty_like(ks[0]), torch.empty_like(vs[0]), idx.clone(),
                torch.empty_like(qs))

    eager = state()
    run(*eager)
    warm = state()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and allocate outside the capture
        run(*warm)
    torch.cuda.current_stream().wait_stream(stream)
    captured = state()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(*captured)
    for t, t0 in zip(captured, state()):  # capture does not execute: start from step 0
        t.copy_(t0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[-1], eager[-1])
    # the caches and lengths after the appends (unwritten cache rows hold NaN in both)
    for got, want in ((captured[0], eager[0]), (captured[1], eager[1]), (captured[2], eager[2])):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.compile
def test_decode_kernels_compile_for_sm90():
    """The decode variants compile for Hopper offline (the interpreter skips the compiler)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    script = Path(__file__).with_name("compile_sm90_decode.py")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=1200, cwd=script.parent)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    assert "compiled" in res.stdout.splitlines()[-1]


@pytest.mark.gpu
@needs_gpu
def test_gpu_split_tickets_repeat(monkeypatch):
    """Many programs racing for each block's ticket (``DECODE_MERGE = "ticket"``): whichever
    finishes last merges, and the counters it resets serve the next call; 50 calls give the
    same bits, and the bits of the two-launch merge."""
    monkeypatch.setattr(config, "DECODE_MERGE", "ticket")
    batch, hq, hkv, d, l_max = 16, 32, 8, 128, 8192
    seqlens = [l_max - 7 * i for i in range(batch)]
    k_cache, v_cache, _ = make_cache(batch, l_max, hkv, d, seqlens, torch.bfloat16)
    q = torch.randn(batch, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    kw = dict(window_size=(4095, 0), sinks=4, softmax_scale=d ** -0.5, num_splits=16)
    first = decode_fwd(q, k_cache, v_cache, lens, **kw)
    for _ in range(50):
        out, lse = decode_fwd(q, k_cache, v_cache, lens, **kw)
        assert torch.equal(out, first[0]) and torch.equal(lse, first[1])
    monkeypatch.setattr(config, "DECODE_MERGE", "kernel")
    two = decode_fwd(q, k_cache, v_cache, lens, **kw)
    assert torch.equal(two[0], first[0]) and torch.equal(two[1], first[1])
    mask = oracle_mask(seqlens, 1, l_max, (4095, 0), 4)
    check_kvcache(q, *first, *kvcache_reference(q, k_cache, v_cache, None, seqlens, mask,
                                                d ** -0.5))
