"""CPU tests of the benchmark harness: pattern builders against brute-force definitions, the
flex mask_mods and BlockMasks against the indices, FLOP counting, output files and the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blocksparse_fsa import bench

L, HKV = 256, 2
REPO = Path(__file__).resolve().parents[1]


def row_sets(pattern, head=0):
    """Causal index set of every query row of ``pattern`` (head ``head``)."""
    idx = pattern.indices[0, head].tolist()
    return [{j for j in row if 0 <= j <= i} for i, row in enumerate(idx)]


def check_common(pattern, width):
    idx = pattern.indices
    assert idx.shape == (1, HKV, pattern.seq_len, width)
    assert idx.dtype == torch.int32 and idx.is_contiguous()
    assert int(idx.min()) >= -1 and int(idx.max()) < pattern.seq_len


@pytest.mark.parametrize("window", [1024, 32, 1])
def test_sliding_window(window):
    p = bench.sliding_window(L, HKV, "cpu", window=window)
    check_common(p, min(window, L))
    for h in range(HKV):
        for i, keys in enumerate(row_sets(p, h)):
            assert keys == set(range(max(0, i - window + 1), i + 1)), i
    assert not p.per_head


@pytest.mark.parametrize("num_keys,stride", [(512, 4), (8, 3)])
def test_dilated(num_keys, stride):
    p = bench.dilated(L, HKV, "cpu", num_keys=num_keys, stride=stride)
    check_common(p, num_keys)
    for i, keys in enumerate(row_sets(p)):
        assert keys == {i - stride * t for t in range(num_keys) if i - stride * t >= 0}, i
    # no slot is lost to the causal cut: -1 exactly where i - stride * t < 0
    assert int((p.indices >= 0).sum()) == HKV * sum(len(s) for s in row_sets(p))


@pytest.mark.parametrize("seq_len,block", [(256, 16), (250, 16), (64, 64)])
def test_bigbird(seq_len, block):
    p = bench.bigbird(seq_len, HKV, "cpu", block=block, seed=3)
    nb = -(-seq_len // block)
    check_common(p, 8 * block)
    blocks = bench.bigbird_blocks(seq_len, HKV, "cpu", block=block, seed=3)
    assert blocks.shape == (HKV, nb, 8)
    for h in range(HKV):
        for qb in range(nb):
            local = [b for b in (qb - 2, qb - 1, qb) if b >= 0]
            glob = [b for b in (0, 1) if b < nb]
            rnd = [b for b in blocks[h, qb, 5:].tolist() if b >= 0]
            assert blocks[h, qb, :5].tolist() == [qb - 2 if qb >= 2 else -1,
                                                  qb - 1 if qb >= 1 else -1, qb,
                                                  0, 1 if nb > 1 else -1]
            assert len(rnd) == min(3, qb) and len(set(rnd)) == len(rnd)
            assert all(0 <= b < qb for b in rnd)
            allowed = set(local) | set(glob) | set(rnd)
            for i in range(qb * block, min((qb + 1) * block, seq_len)):
                want = {j for b in allowed for j in range(b * block, min((b + 1) * block, seq_len))
                        if j <= i}
                assert row_sets(p, h)[i] == want, (h, i)
    assert p.per_head
    # random blocks differ between heads and are reproducible
    again = bench.bigbird_blocks(seq_len, HKV, "cpu", block=block, seed=3)
    assert torch.equal(blocks, again)


def test_bigbird_default_width():
    p = bench.bigbird(1024, HKV, "cpu")
    check_common(p, 512)


@pytest.mark.parametrize("k", [1024, 16])
def test_topk_random(k):
    p = bench.topk_random(L, HKV, "cpu", k=k, seed=1)
    check_common(p, k)
    idx = p.indices[0]
    rows = torch.arange(L)[:, None]
    valid = idx >= 0
    assert bool(((idx <= rows) | ~valid).all())  # within the causal prefix [0, i]
    short = (rows[:, 0] + 1 <= k)
    # short rows: all of [0, i] exactly once, the rest -1
    for i in torch.nonzero(short)[:, 0].tolist():
        for h in range(HKV):
            assert sorted(x for x in idx[h, i].tolist() if x >= 0) == list(range(i + 1))
    # long rows: k draws, all valid
    assert bool(valid[:, ~short].all())
    assert p.per_head
    assert torch.equal(p.indices, bench.topk_random(L, HKV, "cpu", k=k, seed=1).indices)
    if (~short).any():
        assert not torch.equal(idx[0, ~short], idx[1, ~short])  # heads draw independently


def brute_mask(pattern):
    """[Hkv, L, L] bool from the index sets."""
    out = torch.zeros(pattern.num_kv_heads, pattern.seq_len, pattern.seq_len, dtype=torch.bool)
    for h in range(pattern.num_kv_heads):
        for i, keys in enumerate(row_sets(pattern, h)):
            out[h, i, sorted(keys)] = True
    return out


def small_patterns():
    return [bench.sliding_window(L, HKV, "cpu", window=40),
            bench.dilated(L, HKV, "cpu", num_keys=20, stride=4),
            bench.bigbird(L, HKV, "cpu", block=16),
            bench.topk_random(L, HKV, "cpu", k=24)]


@pytest.mark.parametrize("pattern", small_patterns(), ids=lambda p: p.name)
def test_masks_agree_with_indices(pattern):
    want = brute_mask(pattern)
    # dense mask (sdpa_mask, topk's flex tensor)
    dense = pattern.dense_mask()
    assert torch.equal(dense.expand_as(want), want)
    # flex mask_mod on the full grid
    mask_mod = pattern.flex_mask()
    h = torch.arange(pattern.num_kv_heads)[:, None, None]
    q = torch.arange(L)[None, :, None]
    kv = torch.arange(L)[None, None, :]
    got = mask_mod(torch.zeros((), dtype=torch.long), h, q, kv)
    assert torch.equal(got.expand_as(want), want)
    # nnz
    assert pattern.nnz() == int(want.sum())
    assert bench.count_nnz(pattern.indices, L, causal=True) == int(want.sum())


@pytest.mark.parametrize("pattern", small_patterns(), ids=lambda p: p.name)
def test_flex_block_mask_gqa(pattern):
    """The BlockMask seen by query head hq is KV head hq // group's pattern."""
    heads_q = 4 * HKV
    bm = bench.flex_block_mask(pattern, heads_q, "cpu")
    want = brute_mask(pattern).repeat_interleave(heads_q // HKV, dim=0)  # [Hq, L, L]
    mask_mod, heads = bench.flex_mask_mod(pattern, heads_q)
    assert heads == (heads_q if pattern.per_head else None)
    hq = torch.arange(heads_q)[:, None, None]
    got = mask_mod(torch.zeros((), dtype=torch.long), hq, torch.arange(L)[None, :, None],
                   torch.arange(L)[None, None, :])
    assert torch.equal(got.expand_as(want), want)
    # every active pair lies in a block the BlockMask visits
    dense_blocks = bm.to_dense()  # [1, H, nq, nk] (H = 1 if broadcast)
    bq, bk = bm.BLOCK_SIZE
    pair_blocks = want.unflatten(1, (-1, bq)).unflatten(3, (-1, bk)).any(2).any(-1)
    assert torch.equal(dense_blocks[0].bool().expand_as(pair_blocks), pair_blocks)
    mb, density = bench.block_mask_stats(bm, pattern.nnz() / HKV)
    assert mb > 0 and 0 < density <= 1


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_matches_dense_reference_cpu():
    """Flex (eager, fwd only on CPU) with our BlockMask == SDPA with the dense mask (GQA)."""
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
    pattern = bench.bigbird(L, HKV, "cpu", block=16, seed=5)
    inp = bench.make_inputs(1, L, 4, HKV, 16, torch.float32, "cpu", requires_grad=False)
    bm = bench.flex_block_mask(pattern, 4, "cpu")
    out = flex_attention(*(x.transpose(1, 2) for x in (inp.q, inp.k, inp.v)), block_mask=bm,
                         enable_gqa=True)
    mask = pattern.dense_mask().repeat_interleave(2, dim=0)[None]
    ref = torch.nn.functional.scaled_dot_product_attention(
        inp.q.transpose(1, 2), *(x.repeat_interleave(2, dim=2).transpose(1, 2)
                                 for x in (inp.k, inp.v)), attn_mask=mask)
    assert bench.rel_err(out, ref) < 1e-5


def test_flop_counting():
    # forward: 4 * nnz * D * Hq * B
    assert bench.pattern_flops(1000, 2, 32, 128, "fwd") == 4 * 1000 * 128 * 32 * 2
    assert bench.pattern_flops(1000, 2, 32, 128, "fwdbwd") == 3.5 * 4 * 1000 * 128 * 32 * 2
    # dense causal: nnz = L (L + 1) / 2 per head
    L_ = 8192
    assert bench.dense_causal_flops(1, 32, L_, 128, "fwd") == 4 * 128 * 32 * L_ * (L_ + 1) / 2
    assert bench.tflops(1e12, 1000.0) == pytest.approx(1.0)  # 1e12 FLOPs in 1 s
    assert bench.tflops(1e12, None) is None
    # sliding window at L=8192, W=1024 (exact): sum_i min(i + 1, W)
    nnz = sum(min(i + 1, 1024) for i in range(8192))
    assert bench.pattern_flops(nnz, 1, 32, 128, "fwd") == pytest.approx(4 * nnz * 128 * 32)


def test_finalize_refuses_speedup_on_mismatch():
    args = bench.parse_args(["--seq-len", str(L)])
    pattern = bench.sliding_window(L, 8, "cpu", window=16)
    rows = []
    for system, status, ms in (("ours", "ok", 1.0), ("flex", "ok", 3.0),
                               ("sdpa_causal", "unchecked", 2.0), ("sdpa_mask", "mismatch", 0.5)):
        for p in bench.PASSES:
            rows.append(bench.Row(pattern.name, L, system, p, status=status, ms=ms))
    bench.finalize(rows, pattern, args, pattern.nnz())
    by = {(r.system, r.pass_name): r for r in rows}
    assert by[("ours", "fwd")].status == "ok"  # flex agreed
    assert by[("ours", "fwd")].speedup_vs_flex == pytest.approx(3.0)
    assert by[("sdpa_causal", "fwd")].speedup_vs_flex == pytest.approx(1.5)
    assert by[("sdpa_mask", "fwd")].speedup_vs_flex is None
    assert by[("sdpa_causal", "fwd")].dense_tflops is not None
    nnz_head = pattern.nnz() / 8
    assert by[("ours", "fwdbwd")].tflops == pytest.approx(
        3.5 * 4 * nnz_head * 128 * 32 / 1.0 / 1e9)
    # ours is a mismatch when every independent check disagrees
    for r in rows:
        r.speedup_vs_flex = None
        if r.system == "flex":
            r.status = "mismatch"
        if r.system == "ours":
            r.status = "ok"
    bench.finalize(rows, pattern, args, pattern.nnz())
    assert by[("ours", "fwd")].status == "mismatch"
    assert all(r.speedup_vs_flex is None for r in rows)


def test_write_results_and_summary(tmp_path):
    rows = [bench.Row("sliding_window", 32768, s, p, ms=1.0 + i, tflops=100.0)
            for i, s in enumerate(bench.SYSTEMS) for p in bench.PASSES]
    meta = {"gpu": "NVIDIA H200", "torch": "x", "batch": 1, "heads_q": 32, "heads_kv": 8,
            "head_dim": 128, "dtype": "bfloat16", "seq_lens": [32768]}
    paths = bench.write_results(rows, meta, tmp_path / "out", plot=False)
    assert [p.name for p in paths] == ["bench_nvidia-h200.json", "bench_nvidia-h200.csv"]
    data = json.loads(paths[0].read_text())
    assert data["meta"]["gpu"] == "NVIDIA H200" and len(data["rows"]) == len(rows)
    assert data["rows"][0]["pass"] == "fwd"
    header = paths[1].read_text().splitlines()[0].split(",")
    assert {"pattern", "seq_len", "system", "pass", "ms", "gpu", "torch"} <= set(header)
    text = "\n".join(bench.summary(rows, [32768], 8192))
    assert "sliding_window" in text and "ours vs flex" in text
    assert bench.format_row(rows[0]).startswith("sliding_window")


def test_git_commit_never_raises(tmp_path):
    assert isinstance(bench.git_commit(tmp_path), str)


def test_cli_help():
    res = subprocess.run([sys.executable, "-m", "blocksparse_fsa.bench", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for flag in ("--seq-len", "--pattern", "--systems", "--passes", "--heads-q", "--heads-kv",
                 "--head-dim", "--dtype", "--out", "--quick", "--no-plot"):
        assert flag in res.stdout


def test_parse_args_defaults():
    args = bench.parse_args([])
    assert args.seq_len == [8192, 32768]
    assert (args.batch, args.heads_q, args.heads_kv, args.head_dim) == (1, 32, 8, 128)
    assert args.torch_dtype == torch.bfloat16 and (args.warmup, args.rep) == (25, 100)
    assert list(args.pattern) == list(bench.PATTERNS) and list(args.systems) == list(bench.SYSTEMS)
    assert bench.parse_args(["--quick"]).rep == 30
    with pytest.raises(SystemExit):
        bench.parse_args(["--heads-q", "6", "--heads-kv", "4"])


def test_main_needs_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert bench.main(["--no-plot"]) == 2


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_runner_smoke_cpu(tmp_path, monkeypatch):
    """The whole sweep on CPU, forward only (flex has no CPU backward), eager flex.

    This tests the harness, not the kernels: ours takes its pure-PyTorch path here (the Triton
    interpreter tier is covered by the kernel tests)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(bench, "compiled_flex_attention", lambda: flex_attention)
    monkeypatch.setattr(bench, "compiled_create_block_mask", lambda: create_block_mask)
    argv = ["--device", "cpu", "--seq-len", "128", "--heads-q", "4", "--heads-kv", "2",
            "--head-dim", "16", "--passes", "fwd", "--pattern", "bigbird", "dilated",
            "--out", str(tmp_path), "--no-plot", "--sdpa-mask-max-len", "128"]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "bench_cpu.json").read_text())["rows"]
    status = {(r["pattern"], r["system"]): r["status"] for r in rows}
    assert len(rows) == 2 * len(bench.SYSTEMS)
    for pat in ("bigbird", "dilated"):
        assert status[(pat, "ours")] == "ok"
        assert status[(pat, "flex")] == "ok"
        assert status[(pat, "sdpa_mask")] == "ok"
        assert status[(pat, "sdpa_causal")] == "unchecked"
    ours = [r for r in rows if r["system"] == "ours"]
    assert all(r["speedup_vs_flex"] and r["tflops"] and r["layout_ms"] for r in ours)
    assert all(r["nnz"] > 0 and 0 < r["density"] <= 1 for r in ours)


def test_layout_build_timer_smoke(tmp_path):
    """``benchmarks/time_layout_build.py`` end to end on the CPU (Triton interpreter): every
    build agrees with the PyTorch one and a CSV comes out."""
    import os
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "benchmarks/time_layout_build.py", "--device", "cpu",
                          "--seq-len", "96", "--heads-kv", "1", "--block", "32x32", "--skip",
                          "torch", "--out", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "MISMATCH" not in res.stdout and res.stdout.count(" ok ") == 3, res.stdout
    assert (tmp_path / "layout_build_cpu.csv").exists()
