"""CPU tests of the benchmark harness: the flex BlockMasks against the patterns' indices, FLOP
counting, the correctness gate, output files, the CLI and a whole sweep on CPU (the patterns
themselves: tests/benchmarks/test_patterns.py)."""

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import blocksparse_fsa as bsa
from blocksparse_fsa.api import attention
from blocksparse_fsa_bench import cli as bench
from blocksparse_fsa_bench import measure, systems
from blocksparse_fsa_bench import patterns as bp

from ..helpers import EXAMPLE, USER_MODULE, brute_mask, small_patterns

L, HKV = 256, 2
REPO = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join([str(REPO), str(REPO / "benchmarks")])


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


def test_flex_exact_block_mask_without_mask_mod():
    """A pattern without a mask_mod gets the exact BlockMask of its 128x128-tile layout."""
    pattern = bp.load_pattern(f"{EXAMPLE}:window_and_globals")[1](L, HKV, "cpu")
    heads_q = 4 * HKV
    bm = bench.flex_block_mask(pattern, heads_q, "cpu")
    assert bm.BLOCK_SIZE == (bench.FLEX_BLOCK, bench.FLEX_BLOCK)
    want = pattern.dense_mask()[0, 0]
    got = bm.mask_mod(torch.zeros((), dtype=torch.long), torch.arange(heads_q)[:, None, None],
                      torch.arange(L)[None, :, None], torch.arange(L)[None, None, :])
    assert torch.equal(got, want.expand_as(got))
    mb, density = bench.block_mask_stats(bm, pattern.nnz() / pattern.groups)
    assert mb > 0 and 0 < density <= 1


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("make", [
    lambda: bp.bigbird(L, HKV, "cpu", block=16, seed=5),
    lambda: bp.nsa_blocks(L, HKV, "cpu", block=16, num_selected=5, seed=5),
    lambda: bp.load_pattern(f"{EXAMPLE}:window_and_globals")[1](L, HKV, "cpu"),
], ids=["bigbird", "nsa_blocks", "user-indices"])
def test_flex_matches_dense_reference_cpu(make):
    """Flex (eager, fwd only on CPU) with our BlockMask == SDPA with the dense mask (GQA)."""
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
    pattern = make()
    inp = bench.make_inputs(1, L, 4, HKV, 16, torch.float32, "cpu", requires_grad=False)
    bm = bench.flex_block_mask(pattern, 4, "cpu")
    out = flex_attention(*(x.transpose(1, 2) for x in (inp.q, inp.k, inp.v)), block_mask=bm,
                         enable_gqa=True)
    mask = pattern.dense_mask()
    mask = mask.repeat_interleave(4 // mask.shape[1], dim=1)
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


def test_host_calls():
    assert bench.host_calls(1.5) == 20 and bench.host_calls(10.0) == 10
    assert bench.host_calls(91.0) == 3 and bench.host_calls(None) == 20


def test_finalize_refuses_speedup_on_mismatch():
    args = bench.parse_args(["--seq-len", str(L)])
    pattern = bp.sliding_window(L, 8, "cpu", window=16)
    rows = []
    for system, status, ms in (("ours", "ok", 1.0), ("ours_indices", "ok", 1.0),
                               ("flex", "ok", 3.0), ("sdpa_causal", "unchecked", 2.0),
                               ("sdpa_mask", "mismatch", 0.5)):
        for p in bench.PASSES:
            rows.append(bench.Row(pattern.name, L, system, p, status=status, ms=ms))
    bench.finalize(rows, pattern, args, pattern.nnz())
    by = {(r.system, r.pass_name): r for r in rows}
    assert by[("ours", "fwd")].status == "ok"  # flex agreed
    assert by[("ours", "fwd")].speedup_vs_flex == pytest.approx(3.0)
    assert by[("ours_indices", "fwd")].status == "ok"
    assert by[("ours_indices", "fwd")].speedup_vs_flex == pytest.approx(3.0)
    assert by[("ours", "fwd")].nnz == pattern.nnz()  # summed over the 8 KV heads
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
    assert by[("ours_indices", "fwd")].status == "mismatch"  # it agreed with ours
    assert all(r.speedup_vs_flex is None for r in rows)


def test_finalize_counts_a_shared_pattern_for_every_head():
    """A pattern stored once for all heads (1, 1, L, W) counts as Hkv heads' worth of pairs."""
    args = bench.parse_args(["--seq-len", str(L)])  # Hkv = 8
    pattern = bp.load_pattern(f"{EXAMPLE}:window_and_globals")[1](L, 8, "cpu")
    assert pattern.groups == 1
    rows = [bench.Row(pattern.name, L, "ours", p, ms=1.0) for p in bench.PASSES]
    bench.finalize(rows, pattern, args, pattern.nnz())
    assert rows[0].nnz == 8 * pattern.nnz()
    assert rows[0].tflops == pytest.approx(4 * pattern.nnz() * 128 * 32 / 1.0 / 1e9)


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
    with pytest.raises(FileExistsError, match="bench_nvidia-h200.json exists"):
        bench.write_results(rows, meta, tmp_path / "out", plot=False)  # never replaced silently
    assert bench.write_results(rows, meta, tmp_path / "out", plot=False, overwrite=True) == paths
    text = "\n".join(bench.summary(rows, [32768], 8192))
    assert "sliding_window" in text and "ours vs flex" in text
    assert bench.format_row(rows[0]).startswith("sliding_window")
    # without flex among the systems there is no "ours vs flex" line (rather than "n/a")
    no_flex = [r for r in rows if r.system != "flex"]
    assert "ours vs flex" not in "\n".join(bench.summary(no_flex, [32768], 8192))


def test_progress_lines():
    """Without a terminal (a log file, CI), one line per step; skipped steps in one line."""
    out = io.StringIO()
    progress = bench.Progress(5, stream=out)
    progress.step("bigbird L=128 ours fwd")
    progress.log("  ours   1.0 s  ok")
    progress.step("bigbird L=128 flex fwd", count=3)
    progress.step("bigbird L=128 sdpa_mask fwd")
    progress.close()
    lines = out.getvalue().splitlines()
    assert [line.split("  (")[0] for line in lines] == [
        "[1/5] bigbird L=128 ours fwd", "  ours   1.0 s  ok", "[2-4/5] bigbird L=128 flex fwd",
        "[5/5] bigbird L=128 sdpa_mask fwd"]
    assert lines[0].endswith(" s)")


def test_progress_bar_needs_tqdm(monkeypatch):
    tqdm = pytest.importorskip("tqdm")
    out = io.StringIO()
    progress = bench.Progress(3, stream=out, bar=True)  # forced: StringIO is no terminal
    for label in ("a", "b", "c"):
        progress.step(label)
    progress.close()
    assert "3/3" in out.getvalue() and "[1/3]" not in out.getvalue()
    assert measure._tqdm() is tqdm.tqdm
    monkeypatch.setattr(measure, "_tqdm", lambda: None)  # not installed: the plain counter
    out = io.StringIO()
    bench.Progress(3, stream=out, bar=True).step("a")
    assert out.getvalue().startswith("[1/3] a")


def test_progress_counts_skipped_passes():
    """A system skipped at setup still accounts for all its passes."""
    args = bench.parse_args(["--seq-len", "64", "--sdpa-mask-max-len", "32"])
    pattern = bp.sliding_window(64, HKV, "cpu", window=8)
    inp = bench.make_inputs(1, 64, 4, HKV, 16, torch.float32, "cpu")
    out = io.StringIO()
    progress = bench.Progress(2, stream=out)
    rows, _ = bench.run_system("sdpa_mask", pattern, inp, args, (None, None), "cpu", progress)
    assert [r.status for r in rows] == ["skipped: dense mask only for L <= 32"] * 2
    assert [line.split("  (")[0] for line in out.getvalue().splitlines()] == [
        "[1/2] sliding_window L=64 sdpa_mask fwd",
        "[2/2] sliding_window L=64 sdpa_mask fwdbwd: skipped: dense mask only for L <= 32"]


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [bench.Row(pat, 8192, s, p, ms=1.0 + i, speedup_vs_flex=0.5 + i)
            for pat in ("nsa_blocks", "my_patterns:window")
            for i, s in enumerate(bench.SYSTEMS) for p in bench.PASSES]
    meta = {"gpu": "NVIDIA H200", "batch": 1, "heads_q": 32, "heads_kv": 8, "head_dim": 128,
            "dtype": "bfloat16"}
    path = bench.plot_results(rows, meta, tmp_path / "bench.png")
    assert path.stat().st_size > 10_000


def test_git_commit_never_raises(tmp_path):
    assert isinstance(bench.git_commit(tmp_path), str)


def test_cli_help():
    res = subprocess.run([sys.executable, "-m", "blocksparse_fsa_bench", "--help"], cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=PYTHONPATH), capture_output=True,
                         text=True, timeout=120)
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
    # the default output: a fresh scratch directory, never the repository's committed results
    assert args.out.parent == Path(tempfile.gettempdir()) / "blocksparse_fsa_bench"
    assert not args.out.exists() and not args.overwrite
    with pytest.raises(SystemExit):
        bench.parse_args(["--heads-q", "6", "--heads-kv", "4"])


def test_parse_args_patterns(capsys):
    args = bench.parse_args(["--pattern", f"{EXAMPLE}:window_and_globals", "nsa_blocks"])
    assert [name for name, _ in args.patterns] == ["bench_my_pattern:window_and_globals",
                                                   "nsa_blocks"]
    assert args.pattern == [f"{EXAMPLE}:window_and_globals", "nsa_blocks"]  # for the metadata
    for bad in ("nope", f"{EXAMPLE}:nope"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--pattern", bad])
        assert f"--pattern {bad}" in capsys.readouterr().err


def test_pattern_batch_must_match(tmp_path, monkeypatch):
    (tmp_path / "user_patterns.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = bench.parse_args(["--pattern", "user_patterns:batched", "--systems", "ours",
                             "--passes", "fwd"])  # --batch 1, the pattern has 2
    rows = bench.run_pattern(*args.patterns[0], 64, args, "cpu")
    assert len(rows) == 1 and rows[0].status.startswith("error (pattern): ValueError: the "
                                                        "pattern has batch 2")


def test_main_refuses_existing_results_before_running(tmp_path, capsys):
    """An --out that already holds this GPU's results stops the run before the sweep."""
    (tmp_path / "bench_cpu.csv").write_text("committed\n")
    argv = ["--device", "cpu", "--seq-len", "64", "--pattern", "sliding_window", "--systems",
            "ours", "--out", str(tmp_path), "--no-plot"]
    assert bench.main(argv) == 2
    assert "bench_cpu.csv exists" in capsys.readouterr().err
    assert (tmp_path / "bench_cpu.csv").read_text() == "committed\n"


def test_main_needs_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert bench.main(["--no-plot"]) == 2


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_runner_smoke_cpu(tmp_path, monkeypatch, capsys):
    """The whole sweep on CPU, forward only (flex has no CPU backward), eager flex.

    This tests the harness, not the kernels: ours takes its pure-PyTorch path here (the Triton
    interpreter tier is covered by the kernel tests)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(systems, "compiled_flex_attention", lambda: flex_attention)
    monkeypatch.setattr(systems, "compiled_create_block_mask", lambda: create_block_mask)
    builds = []  # layouts built by sparse_attn_func(attn_indices=) on a cache miss
    build_layout = attention.build_layout
    monkeypatch.setattr(attention, "build_layout",
                        lambda *a, **kw: builds.append(a[0].shape) or build_layout(*a, **kw))
    cleared = []  # ours_indices empties the layout cache before it runs and when it is done
    clear = bsa.clear_layout_cache
    monkeypatch.setattr(bsa, "clear_layout_cache", lambda: cleared.append(1) or clear())
    argv = ["--device", "cpu", "--seq-len", "128", "--heads-q", "4", "--heads-kv", "2",
            "--head-dim", "16", "--passes", "fwd", "--pattern", "bigbird", "nsa_blocks", "dilated",
            "--out", str(tmp_path), "--no-plot", "--sdpa-mask-max-len", "128"]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "bench_cpu.json").read_text())["rows"]
    status = {(r["pattern"], r["system"]): r["status"] for r in rows}
    assert len(rows) == 3 * len(bench.SYSTEMS)
    for pat in ("bigbird", "nsa_blocks", "dilated"):
        assert status[(pat, "ours")] == "ok"
        assert status[(pat, "ours_indices")] == "ok"
        assert status[(pat, "flex")] == "ok"
        assert status[(pat, "sdpa_mask")] == "ok"
        assert status[(pat, "sdpa_causal")] == "unchecked"
    ours = [r for r in rows if r["system"] == "ours"]
    assert all(r["speedup_vs_flex"] and r["tflops"] and r["layout_ms"] for r in ours)
    assert all(r["nnz"] > 0 and 0 < r["density"] <= 1 for r in ours)
    assert all(r["host_us"] > 0 for r in rows if r["ms"])
    # ours_indices: one build per pattern (the check), every timed call found it in the cache
    assert len(builds) == 3
    assert len(cleared) == 2 * 3  # before and after each pattern's ours_indices
    captured = capsys.readouterr()
    assert "host us per fwd call, attn_indices= (layout cache) vs layout=:  bigbird" in captured.out
    steps = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert len(steps) == 3 * len(bench.SYSTEMS)  # one per (pattern, system, pass)
    n = 3 * len(bench.SYSTEMS)
    assert steps[0].startswith(f"[1/{n}] bigbird L=128 ours fwd")
    assert steps[-1].startswith(f"[{n}/{n}] dilated L=128 sdpa_mask fwd")


def test_frontier_systems_skip_what_does_not_apply(monkeypatch):
    """FA4's window and varlen systems run only on their own patterns, and every FA4 system
    is skipped with the reason when flash_attn.cute does not import."""
    import builtins

    inp = bench.make_inputs(1, 64, 4, 2, 16, torch.float32, "cpu")
    args = bench.parse_args(["--device", "cpu"])
    bigbird = bp.bigbird(64, 2, "cpu", block=16)
    with pytest.raises(bench.Skipped, match="not a causal sliding window"):
        bench.setup_fa4_window(bigbird, inp, args)
    with pytest.raises(bench.Skipped, match="not packed documents"):
        bench.setup_fa4_varlen(bigbird, inp, args)
    real_import = builtins.__import__

    def no_fa4(name, *a, **kw):
        if name.startswith("flash_attn"):
            raise ImportError("no module named flash_attn")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_fa4)
    window = bp.sliding_window(64, 2, "cpu", window=16)
    for setup, pattern in ((bench.setup_fa4_window, window),
                           (bench.setup_fa4_varlen, bp.documents(64, 2, "cpu")),
                           (bench.setup_fa4_dense_causal, bigbird)):
        with pytest.raises(bench.Skipped, match="flash-attn-4 does not import"):
            setup(pattern, inp, args)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_runner_user_patterns_cpu(tmp_path, monkeypatch):
    """User patterns through the whole harness: indices with and without a mask_mod, a
    non-causal per-head layout, per-batch indices; every system checked against ours."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(systems, "compiled_flex_attention", lambda: flex_attention)
    monkeypatch.setattr(systems, "compiled_create_block_mask", lambda: create_block_mask)
    (tmp_path / "user_patterns.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    patterns = [f"{EXAMPLE}:window_and_globals", f"{EXAMPLE}:window_and_globals_with_mask",
                "user_patterns:random_layout", "user_patterns:batched"]
    argv = ["--device", "cpu", "--seq-len", "128", "--batch", "2", "--heads-q", "4",
            "--heads-kv", "2", "--head-dim", "16", "--passes", "fwd", "--pattern", *patterns,
            "--systems", "ours", "flex", "sdpa_mask", "--out", str(tmp_path), "--no-plot",
            "--sdpa-mask-max-len", "128"]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert data["meta"]["patterns"] == patterns
    rows = {(r["pattern"], r["system"]): r for r in data["rows"]}
    assert len(rows) == 4 * 3
    for name in ("bench_my_pattern:window_and_globals",
                 "bench_my_pattern:window_and_globals_with_mask", "user_patterns:random_layout",
                 "user_patterns:batched"):
        for system in ("ours", "flex", "sdpa_mask"):
            assert rows[(name, system)]["status"] == "ok", (name, system, rows[(name, system)])
    flex = rows[("bench_my_pattern:window_and_globals", "flex")]
    assert "exact BlockMask" in flex["note"] and flex["layout_ms"] is not None
    assert rows[("bench_my_pattern:window_and_globals_with_mask", "flex")]["note"] == ""
    layout_row = rows[("user_patterns:random_layout", "ours")]
    assert layout_row["layout_ms"] is None and "own layout" in layout_row["note"]
    # nnz: summed over the 2 KV heads; the window's heads share one pattern
    causal_pairs = 128 * 129 // 2  # L = 128: the window covers the whole causal prefix
    assert rows[("bench_my_pattern:window_and_globals", "ours")]["nnz"] == 2 * causal_pairs


def test_layout_build_timer_smoke(tmp_path):
    """``benchmarks/time_layout_build.py`` end to end on the CPU (Triton interpreter): every
    build agrees with the PyTorch one and a CSV comes out."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=PYTHONPATH)
    res = subprocess.run([sys.executable, "benchmarks/time_layout_build.py", "--device", "cpu",
                          "--seq-len", "96", "--heads-kv", "1", "--block", "32x32", "--skip",
                          "torch", "--out", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    # triton build_layout on both timers and as a first build, triton tiles only with and
    # without the window scan, numba, the analytic window layout on both timers
    assert "MISMATCH" not in res.stdout and res.stdout.count(" ok ") == 8, res.stdout
    assert (tmp_path / "layout_build_cpu.csv").exists()


def test_profile_kernels_smoke():
    """``benchmarks/profile_kernels.py`` on the CPU (interpreter, which emulates TMA): both load
    paths run and agree, on a plain and on a computed-dilation-order pattern."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=PYTHONPATH)
    res = subprocess.run([sys.executable, "benchmarks/profile_kernels.py", "--device", "cpu",
                          "--seq-len", "256", "--heads-q", "2", "--heads-kv", "1",
                          "--head-dim", "16", "--pattern", "sliding_window",
                          "dilated_reordered"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split() for line in res.stdout.splitlines() if " fwd " in line]
    assert [r[:2] for r in rows] == [["sliding_window", "pointer"], ["sliding_window", "tma"],
                                     ["dilated_reordered", "pointer"],
                                     ["dilated_reordered", "tma3d"]], res.stdout
    assert all(float(r[-1]) < 1e-4 for r in rows), res.stdout
