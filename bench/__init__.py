"""tilecl benchmarks: ``python -m bench --suite cpu|gpu|smoke`` (see bench/README.md).

Modules: ``providers`` (losses, inputs, every tilecl backend and the baselines, flops),
``harness`` (the setup factory, timers, peak-memory probes, the batch-size sweep),
``suites`` (the CPU / GPU / smoke grids and the CPU headline target), ``report`` (JSON, markdown,
plots). ``bench/test_bench_*.py`` are the pytest-benchmark entries
(``pytest bench/ --benchmark-only``), never collected by ``pytest tests``.
"""
