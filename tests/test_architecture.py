"""The library's shape as a contract: the import-linter layers hold, no import cycle among its
modules, no module over 500 lines, and benchmarks smaller than the library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

MAX_LINES = 500
#: Issue 20's bar for benchmarks/ (.py and .sh, tests included): half of its 5.0k lines then;
#: raised from 2500 to 2700 for generalization.py and its test (issue 21, leave-one-source-out),
#: to 3200 for throughput.py and its test (issue 23: every pass against its ceiling and TRL), and
#: to 3600 for noisy_pool.py, the KTO peer and their tests (issue 22: every method on noisy pools).
MAX_BENCHMARK_LINES = 3600


def _lines(paths) -> dict[str, int]:
    return {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in paths}


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint), "--config", str(REPO / ".importlinter")], cwd=REPO,
                         text=True, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_no_import_cycle_among_library_modules():
    import grimp

    graph = grimp.build_graph("u2a_dist", include_external_packages=False)
    modules = sorted(graph.modules)
    # a cycle is a module reachable from itself through one of the modules it imports
    cycles = [m for m in modules
              if any(graph.chain_exists(importer=dep, imported=m)
                     for dep in graph.find_modules_directly_imported_by(m))]
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_no_library_module_over_500_lines_and_benchmarks_are_smaller_than_the_library():
    library = _lines((REPO / "u2a_dist").rglob("*.py"))
    too_long = {k: v for k, v in library.items() if v > MAX_LINES}
    assert not too_long, too_long
    benchmarks = _lines(p for p in (REPO / "benchmarks").rglob("*")
                        if p.suffix in (".py", ".sh"))
    assert sum(benchmarks.values()) < sum(library.values())
    assert sum(benchmarks.values()) <= MAX_BENCHMARK_LINES, sorted(benchmarks.items())
