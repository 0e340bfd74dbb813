"""Sparse-pattern benchmark: ours vs FlexAttention vs SDPA (see ``blocksparse_fsa/bench.py``).

    python benchmarks/bench_patterns.py [--quick] [--seq-len 8192 32768] [--out DIR] ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from blocksparse_fsa.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
