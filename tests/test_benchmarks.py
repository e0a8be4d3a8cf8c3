"""The benchmark runner as users run it: ``python benchmarks/benchmark.py SUBCOMMAND``."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def benchmark(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "benchmarks/benchmark.py", *args], capture_output=True, text=True,
                          cwd=REPO, env=env)


@pytest.mark.slow  # a subprocess that builds and steps 4 models: about 8 s on 2 cores
def test_memory_columns_prints_the_header_and_writes_one_row_per_column_count_and_mode(tmp_path):
    result = benchmark("memory", "--mode", "columns", "--device", "cpu", "--columns", "1,2", "--dim", "32",
                       "--depths", "1,1,1,1", "--heads", "2", "--tokens", "8", "--out", str(tmp_path / "memory"))
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("# CPU") and "commit " in first and "torch " in first
    assert first.endswith("memory --mode columns --device cpu --columns 1,2 --dim 32 --depths 1,1,1,1 --heads 2 "
                          f"--tokens 8 --out {tmp_path / 'memory'}")
    with open(tmp_path / "memory.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["columns"], r["mode"]) for r in rows] == [("1", "reversible"), ("1", "plain"), ("2", "reversible"),
                                                         ("2", "plain")]
    saved = {(r["columns"], r["mode"]): float(r["saved_MiB"]) for r in rows}
    assert saved["2", "plain"] > saved["1", "plain"] > saved["2", "reversible"] > 0  # plain keeps every column
    assert (tmp_path / "memory.png").stat().st_size > 0


def test_a_cuda_benchmark_on_cpu_is_one_usage_error_and_writes_nothing(tmp_path):
    result = benchmark("throughput", "--device", "cpu", "--out", str(tmp_path / "throughput"))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "benchmark.py: error: throughput measures on cuda, not cpu"
    assert result.stdout == "" and list(tmp_path.iterdir()) == []
