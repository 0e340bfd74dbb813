"""Sparse-pattern benchmark: ours vs FlexAttention vs SDPA (``blocksparse_fsa_bench.cli``).

    python benchmarks/bench_patterns.py [--quick] [--seq-len 8192 32768] [--out DIR] ...
"""

import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path[:0] = [str(here.parent), str(here)]  # run from a checkout, uninstalled

from blocksparse_fsa_bench.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
