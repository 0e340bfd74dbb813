"""benchmarks/bench_varlen.py at toy sizes on the CPU (pure-PyTorch path): every row is
checked against ours and timed, and the CSV / markdown land in --out."""

import csv

import bench_varlen as bench  # benchmarks/ is on the path (conftest)


def test_doc_lengths_are_nine_uneven_documents():
    assert bench.doc_lengths(32768) == list(bench.DOC_LENGTHS)
    small = bench.doc_lengths(200)
    assert len(small) == 9 and sum(small) == 200 and min(small) >= 1


def test_smoke_run_writes_checked_rows(tmp_path):
    results = bench.main(["--out", str(tmp_path), "--device", "cpu", "--total", "160",
                          "--hq", "4", "--hkv", "2", "--dim", "16", "--dtype", "float32",
                          "--window", "20", "--backend", "torch", "--systems", "",
                          "--reps", "1"])
    assert [(r["row"], r["system"]) for r in results] == [
        ("documents", "varlen"), ("documents", "varlen_layout"), ("documents", "document"),
        ("window(20,0)", "window"), ("window(20,0)", "indices")]
    assert all(r["status"] == "ok" and r["check_max_abs"] <= 1e-4 for r in results)
    with open(tmp_path / "bench_varlen.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert "| documents | varlen | ok |" in (tmp_path / "bench_varlen.md").read_text()
