"""Benchmarks, run from the repository root as modules: `python -m bench.table`, `bench.curve`,
`bench.speed`, `bench.index_speed`, `bench.collect`. Shared helpers: `bench.common`; figures: `bench.plots`."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before any bench module imports TensorFlow
