"""CPU smoke test of ``benchmarks/bench_gather.py`` (the kernels run under the interpreter)."""

import csv
import importlib.util
from pathlib import Path

import pytest

from ..helpers import INTERPRET

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gather.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gather", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_configs():
    script = load_script()
    args = script.parse_args(["--sweep", "--heads-q", "8", "--heads-kv", "2", "--block-n", "32",
                              "--rows", "64", "--head-split", "1", "2", "3", "--warps", "4",
                              "--stages", "2", "3"])
    assert script.sweep_configs(args, "fwd") == [{}, dict(BLOCK_N=32, num_warps=4, num_stages=2),
                                                 dict(BLOCK_N=32, num_warps=4, num_stages=3)]
    dkdv = script.sweep_configs(args, "dkdv")
    assert dkdv[0] == {} and len(dkdv) == 1 + 2 * 2  # head_split 3 does not divide 4
    assert script.sweep_configs(script.parse_args([]), "dkdv") == [{}]


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU smoke test under TRITON_INTERPRET=1")
def test_bench_gather_runs_on_cpu(tmp_path):
    script = load_script()
    argv = ["--device", "cpu", "--seq-len", "40", "--heads-q", "2", "--heads-kv", "1",
            "--head-dim", "16", "--dtype", "fp16", "--pattern", "topk_random", "--out",
            str(tmp_path)]
    assert script.main(argv) == 0
    with open(tmp_path / "bench_gather_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["system"], r["pass_"]) for r in rows] == [
        ("tile", "fwd"), ("tile", "bwd"), ("gather", "fwd"), ("gather", "bwd"),
        ("gather", "dkdv")]
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 for r in rows)
    assert float(rows[0]["max_rel_err"]) < 1e-2 and int(rows[0]["nnz"]) > 0
