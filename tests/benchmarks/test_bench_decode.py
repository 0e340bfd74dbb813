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
                 "--patterns", "window"])
    rows = list(csv.DictReader(open(tmp_path / "bench_decode_cpu.csv")))
    methods = {r["method"] for r in rows}
    assert {"ours", "ours-paged", "flex", "sdpa-dense", "ours (kvcache)",
            "tile walker"} <= methods
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
