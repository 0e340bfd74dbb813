"""Context parallelism on the CPU: gloo, 2 and 4 processes, against the single-process call.

Each spawn runs every pattern in one process group (spawning costs seconds); every rank builds
the whole inputs from one seed, runs the single-process call and the float64 reference, and
checks its own rows and keys with the suite's tolerance rule.
"""

import datetime
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blocksparse_fsa import build_layout, patterns, sparse_attn_func
from blocksparse_fsa.distributed import (CommStats, context_parallel_attn, restrict_layout,
                                         shard, shard_positions, touched_key_tiles)
from blocksparse_fsa.kernels import common
from blocksparse_fsa.reference import dense_attention, sparse_attention
from tests.helpers import ATOL, INTERPRET, assert_rule

ROOT = Path(__file__).resolve().parents[1]


# ---- one rank's checks ------------------------------------------------------------------------
def _case_inputs(seq_len, hq, hkv, dim, seed, batch, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, seq_len, h, dim, generator=gen).to(dtype)
               for h in (hq, hkv, hkv))
    dout = torch.randn(batch, seq_len, hq, dim, generator=gen).to(dtype)
    dlse = torch.randn(batch, hq, seq_len, generator=gen)
    return q, k, v, dout, dlse


def _loss(out, lse, dout, dlse):
    return (out.float() * dout.float()).sum() + (lse.where(lse.isfinite(), 0.0) * dlse).sum()


def _grads(fn, q, k, v, dout, dlse):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    _loss(out, lse, dout, dlse).backward()
    return [out.detach(), lse.detach(), q.grad, k.grad, v.grad]


def _random_indices(batch, heads, seq_len, width, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, seq_len, (batch, heads, seq_len, width), generator=gen)
    return idx


def _cases(seq_len, block):
    """``(name, pattern kwargs, single-device layout, options)`` for every pattern."""
    docs = torch.tensor([0, 50, seq_len // 2 + 3, seq_len // 2 + 4, seq_len])
    window = patterns.sliding_window(seq_len, left=40, is_causal=True, block_m=block,
                                     block_n=block)
    window_nc = patterns.sliding_window(seq_len, left=20, right=20, block_m=block,
                                        block_n=block)
    doc = patterns.document(docs, is_causal=True, block_m=block, block_n=block)
    bigbird = patterns.bigbird(seq_len, block_size=block, num_random=1, heads=2, block_m=block,
                               block_n=block)
    scattered = _random_indices(2, 2, seq_len, 6, seed=3)
    local_window = torch.arange(seq_len)[:, None] + torch.arange(-8, 9)[None, :]
    local_window = local_window.where((local_window >= 0) & (local_window < seq_len), -1)
    local_window = local_window[None, None]
    yield "window-causal", dict(layout=window), window, {}
    yield "window-headtail", dict(layout=window), window, dict(shard_order="head_tail")
    yield "window-gathered", dict(layout=window_nc), window_nc, dict(gather_threshold=0.0)
    yield "window-noncausal", dict(layout=window_nc), window_nc, dict(shard_order="head_tail")
    yield "documents-causal", dict(layout=doc), doc, dict(shard_order="head_tail")
    yield "bigbird", dict(layout=bigbird), bigbird, {}
    yield "scattered-causal", dict(attn_indices=scattered, is_causal=True), build_layout(
        scattered, seq_len, is_causal=True), {}
    yield "scattered-halo", dict(attn_indices=scattered), build_layout(scattered, seq_len), dict(
        gather_threshold=1.0, shard_order="head_tail")
    yield "indices-rows-causal", dict(attn_indices=local_window, is_causal=True), build_layout(
        local_window, seq_len, is_causal=True), dict(local_rows=True, shard_order="head_tail")
    yield "window-fp16", dict(layout=window), window, dict(dtype=torch.float16)
    yield "dense-causal", dict(is_causal=True), build_layout(
        torch.arange(seq_len).expand(1, 1, seq_len, seq_len), seq_len, is_causal=True), {}


def _check_rank(rank, world, seq_len, block, backend, names, repeat, device="cpu"):
    """Every case in ``names`` (all if None) on this rank; those in ``repeat`` run twice, with
    bitwise-equal outputs and gradients."""
    stats_window = CommStats()
    for case, (name, kwargs, layout, options) in enumerate(_cases(seq_len, block)):
        if names is not None and name not in names:
            continue
        options = dict(options)
        order = options.get("shard_order", "contiguous")
        dtype = options.pop("dtype", torch.float32)
        hq, hkv = 4, 2
        batch = 2 if name.startswith("scattered") else 1  # a layout of batch 2, and broadcast
        q, k, v, dout, dlse = _case_inputs(seq_len, hq, hkv, 16, seed=case, batch=batch,
                                           dtype=dtype)
        pos = shard_positions(seq_len, world, rank, order)
        if options.pop("local_rows", False):
            kwargs = dict(kwargs, attn_indices=kwargs["attn_indices"][:, :, pos])
        kwargs = {key: value.to(device) if hasattr(value, "to") else value
                  for key, value in kwargs.items()}
        layout = layout.to(device)
        q, k, v, dout, dlse = (t.to(device) for t in (q, k, v, dout, dlse))
        stats = stats_window if name == "window-causal" else CommStats()

        def cp(qs, ks, vs, kwargs=kwargs, options=options, stats=stats):
            return context_parallel_attn(qs, ks, vs, return_lse=True, backend=backend,
                                         stats=stats, **kwargs, **options)

        def single(q, k, v, layout=layout):  # the rule's low-precision run: the same math
            if q.dtype != torch.float32:  # in the inputs' precision, as the rule has it
                return dense_attention(q, k, v, layout.to_dense_mask())
            return sparse_attn_func(q, k, v, layout=layout, return_lse=True,
                                    backend="torch" if device == "cpu" else backend)

        def reference(q, k, v, layout=layout):
            return sparse_attention(q, k, v, layout, q.shape[-1] ** -0.5)

        rows = [shard(t, world, rank, order) for t in (q, k, v, dout)]
        ours = _grads(cp, *rows[:3], rows[3], shard(dlse, world, rank, order, dim=2))
        lowp = _grads(single, q, k, v, dout, dlse)
        ref = _grads(reference, *(t.double() for t in (q, k, v)), dout, dlse)
        dims = (1, 2, 1, 1, 1)  # out, lse, dq, dk, dv: this rank's rows / keys
        for label, o, lo, r, d in zip(("out", "lse", "dq", "dk", "dv"), ours, lowp, ref, dims):
            assert_rule(f"rank {rank} {name} {label}", o, shard(lo, world, rank, order, d),
                        shard(r, world, rank, order, d), ATOL[dtype])
        # where the pattern decides it (elsewhere it depends on the window against the chunks)
        if name in ("window-gathered", "scattered-causal", "dense-causal", "bigbird"):
            assert stats.gathered == stats.calls, (name, stats)
        elif name in ("window-causal", "scattered-halo", "documents-causal"):
            assert stats.gathered == 0, (name, stats)
        if name in repeat:
            again = _grads(cp, *rows[:3], rows[3], shard(dlse, world, rank, order, dim=2))
            for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, again):
                assert torch.equal(a, b), f"rank {rank} {name}: {label} differs between runs"
    if names is None or "window-causal" in names:
        # a window's halo is a fraction of an all-gather; what is sent comes back as gradients
        sent = torch.tensor([stats_window.sent_fwd, stats_window.sent_bwd], device=device)
        dist.all_reduce(sent)
        assert stats_window.calls >= 1 and not stats_window.gathered
        assert 0 < sent[0] == sent[1] < stats_window.all_gather * world / 2, sent


def _worker(rank, world, init_file, seq_len, block, backend, names, repeat, device):
    torch.set_num_threads(1)
    # the pure-PyTorch path's backward accumulates with index_put, bitwise reproducible on the
    # CPU only in deterministic mode; the exchange itself needs no such mode
    torch.use_deterministic_algorithms(device == "cpu")
    if device == "cuda":
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if device == "cpu" else "nccl",
                            init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    common.POISON_OUTPUTS = True
    try:
        _check_rank(rank, world, seq_len, block, backend, names, repeat, device)
    finally:
        dist.destroy_process_group()


def _spawn(world, seq_len, block, backend, names=None, repeat=(), device="cpu"):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), seq_len, block, backend,
                                names, repeat, device), nprocs=world, join=True)


# ---- the tests ----------------------------------------------------------------------------
def test_context_parallel_torch_path_2_ranks():
    _spawn(2, seq_len=256, block=32, backend="torch",
           repeat=("window-headtail", "bigbird", "scattered-halo"))


def test_context_parallel_torch_path_4_ranks():
    _spawn(4, seq_len=256, block=32, backend="torch",
           names=("window-causal", "window-headtail", "documents-causal", "bigbird",
                  "scattered-halo", "indices-rows-causal"), repeat=("documents-causal",))


@pytest.mark.skipif(not INTERPRET, reason="the CPU interpreter tier")
def test_context_parallel_triton_interpreter():
    _spawn(2, seq_len=128, block=32, backend="triton",
           names=("window-headtail", "scattered-causal"), repeat=("window-headtail",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2
                    or INTERPRET, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("world", [2, 4, 8])
def test_context_parallel_nccl(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    _spawn(world, seq_len=128 * world, block=32, backend="triton",
           repeat=("window-headtail", "bigbird", "scattered-halo"), device="cuda")


def test_restrict_layout_matches_rows_of_the_pattern():
    seq_len, block = 192, 32
    idx = _random_indices(1, 2, seq_len, 5, seed=1)
    layout = build_layout(idx, seq_len, is_causal=True, block_m=block, block_n=block)
    q_tiles = torch.tensor([4, 1, 2])
    touched = touched_key_tiles(layout, q_tiles)
    k_map = torch.full((layout.num_k_tiles,), -1)
    k_map[touched.nonzero().flatten().flip(0)] = torch.arange(int(touched.sum()))  # reversed
    sub = restrict_layout(layout, q_tiles, k_map, int(touched.sum()) * block)
    dense = layout.to_dense_mask()
    rows = torch.cat([torch.arange(t * block, (t + 1) * block) for t in q_tiles.tolist()])
    keys = torch.cat([torch.arange(t * block, (t + 1) * block)
                      for t in touched.nonzero().flatten().flip(0).tolist()])
    assert torch.equal(sub.to_dense_mask(), dense[:, :, rows][:, :, :, keys])
    assert sub.nnz == int(sub.to_dense_mask().sum())
    with pytest.raises(ValueError, match="leaves out a key tile"):
        restrict_layout(layout, q_tiles, k_map.where(k_map != 0, -1), sub.k_len)


def test_restrict_layout_last_partial_query_tile():
    layout = patterns.sliding_window(100, left=10, block_m=32, block_n=32)
    sub = restrict_layout(layout, torch.tensor([1, 3]), torch.arange(4), 100)
    assert sub.q_len == 32 + 4
    rows = torch.cat([torch.arange(32, 64), torch.arange(96, 100)])
    assert torch.equal(sub.to_dense_mask()[0, 0], layout.to_dense_mask()[0, 0, rows])
    with pytest.raises(ValueError, match="partial"):
        restrict_layout(layout, torch.tensor([3, 1]), torch.arange(4), 100)


def test_shard_positions_head_tail():
    assert shard_positions(16, 2, 0, "head_tail").tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shard_positions(16, 2, 1, "contiguous").tolist() == list(range(8, 16))
    with pytest.raises(ValueError, match="equal"):
        shard_positions(18, 4, 0, "head_tail")


def test_context_parallel_needs_a_process_group():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_attn(q, q, q)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_is_the_single_device_call(one_rank_group):
    q, k, v, _, _ = _case_inputs(96, 4, 2, 16, seed=0, batch=1)
    layout = patterns.sliding_window(96, left=20, is_causal=True, block_m=32, block_n=32)
    out, lse = context_parallel_attn(q, k, v, layout=layout, return_lse=True, backend="torch")
    want = sparse_attn_func(q, k, v, layout=layout, return_lse=True, backend="torch")
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(shard_order="zigzag"), ValueError, "shard_order"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (dict(stats={}), TypeError, "CommStats"),
    (dict(gather_threshold=2), ValueError, "gather_threshold"),
    (dict(layout=patterns.sliding_window(64, left=4)), ValueError, "q_len=64"),
    (dict(layout=patterns.sliding_window(96, left=4, block_m=32, block_n=64)), ValueError,
     "block_n=64"),
    (dict(layout=patterns.sliding_window(96, left=4), is_causal=True), ValueError, "is_causal"),
    (dict(attn_indices=torch.zeros(1, 1, 50, 2, dtype=torch.long)), ValueError, "50 rows"),
    (dict(attn_indices=torch.zeros(1, 3, 96, 2, dtype=torch.long)), ValueError, "3 heads"),
], ids=lambda x: x.replace(" ", "-") if isinstance(x, str) else "")
def test_context_parallel_argument_errors(one_rank_group, kwargs, error, match):
    q, k, v, _, _ = _case_inputs(96, 4, 2, 16, seed=0, batch=1)
    with pytest.raises(error, match=match):
        context_parallel_attn(q, k, v, backend=kwargs.pop("backend", "torch"), **kwargs)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        context_parallel_attn(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(
            -1, -1, 3, -1))


def _torchrun(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_example_runs_under_torchrun():
    done = _torchrun("examples/context_parallel.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "matches the single-device call" in done.stdout


def test_benchmark_smoke_on_cpu(tmp_path):
    done = _torchrun("benchmarks/bench_context_parallel.py", "--device", "cpu", "--seq-lens",
                     "256", "--heads", "4", "2", "--head-dim", "16", "--window", "32",
                     "--block", "32", "--reps", "1", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    table = (tmp_path / "context_parallel_2ranks.csv").read_text().splitlines()
    assert table[0].startswith("pattern,") and len(table) > 3, table
