"""Benchmarks and reports (DESIGN §7): ``python -m bench.run --suite {cpu,gpu} [--quick] --out DIR``.

Modules: ``rows`` (result rows, CSV, the ``Recorder``), ``work`` (FLOP / byte / pair formulas),
``timing`` (timers, per-case time limit, ceilings), ``env`` (run environment and metadata), ``guards``
(error notes, memory, accuracy checks), ``providers`` (attention
implementations under test), ``bench_kernels`` (dense / block-sparse / top-k), ``bench_decode``
(paged decode, generation), ``bench_modules`` (MLA modules), ``bench_memory`` (peak memory, KV-cache
bytes), ``report`` (CSV, Markdown, PNG), ``run`` (the entry point), ``gpu_check.sh`` (one-shot GPU check),
``compile_report`` (``python -m bench.compile_report``: registers, spills, shared memory and wgmma use of
every kernel configuration for sm80/sm90, compiled without a GPU).
"""
