"""jaxlmc's benchmarks: `python -m bench [--quick]` runs the suite; `python -m bench.bench_train` etc. run one."""
