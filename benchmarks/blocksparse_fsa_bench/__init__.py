"""The benchmark harness of blocksparse_fsa: ours vs FlexAttention vs SDPA on sparse patterns.

Run it as ``blocksparse-fsa-bench`` (the console script), ``python -m blocksparse_fsa_bench``
or ``python benchmarks/bench_patterns.py`` from a checkout. It lives outside the library so
that ``import blocksparse_fsa`` carries no benchmark code; it is installed beside it.
"""
