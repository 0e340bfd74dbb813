"""The benchmark harness of blocksparse_fsa: ours vs FlexAttention vs SDPA on sparse patterns.

Run it as ``blocksparse-fsa-bench`` (the console script), ``python -m blocksparse_fsa_bench``
or ``python benchmarks/bench_patterns.py`` from a checkout. It lives outside the library so
that ``import blocksparse_fsa`` carries no benchmark code; it is installed beside it.

Modules: ``cli`` (arguments and the sweep; its docstring documents the method), ``systems``
(the competitors and their set-up), ``measure`` (checks, timings, FLOPs, progress), ``report``
(table, summary, result files, plot), ``patterns`` (the built-in and user patterns).
"""
