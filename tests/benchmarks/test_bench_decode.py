"""CPU smoke test of ``benchmarks/bench_decode.py``: tiny shapes, every baseline that runs on
the CPU agrees with ours and gets a time."""

import csv
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_decode.py"


def test_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--smoke", "--out", str(tmp_path), "--lengths", "160", "--batches", "2",
                 "--patterns", "window", "topk"])
    rows = list(csv.DictReader(open(tmp_path / "bench_decode_cpu.csv")))
    methods = {r["method"] for r in rows}
    assert {"ours", "ours-paged", "ours-graph-32-layers", "flex", "sdpa-dense",
            "ours (kvcache, split kernel)", "ours (kvcache, tile walker)"} <= methods
    assert all(r["ms"] and "FAILED" not in r["note"] for r in rows), rows
    assert (tmp_path / "bench_decode_cpu.md").read_text().count("\n| ") == len(rows) + 1


def test_quick_sweep(tmp_path):
    """``--sweep quick``: every launch config of the grid runs and agrees with the default."""
    spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--smoke", "--out", str(tmp_path), "--lengths", "160", "--batches", "2",
                 "--patterns", "window", "--sweep", "quick"])
    rows = list(csv.DictReader(open(tmp_path / "bench_decode_cpu.csv")))
    swept = [r for r in rows if r["method"].startswith("sweep ")]
    assert len(swept) == len(script.SWEEP["quick"])
    assert all(r["ms"] and "FAILED" not in r["note"] for r in swept), swept


def test_fa4_decodes_through_varlen(monkeypatch):
    """FlashAttention-4 has no ``flash_attn_with_kvcache``: the baseline calls its varlen entry
    point with ``seqused_k`` and keeps the output of its (out, lse)."""
    import sys
    import types

    calls = []

    def varlen(q, k, v, **kw):
        calls.append(kw)
        return q + 1, None

    package, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    cute.flash_attn_varlen_func = varlen
    package.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fn, where = script.fa_kvcache()
    assert where == "flash_attn.cute.flash_attn_varlen_func(seqused_k=)"
    assert fn(1, None, None, cache_seqlens="lens", causal=True, window_size=(7, 0)) == 2
    assert calls == [dict(seqused_k="lens", causal=True, window_size=(7, 0))]
