"""Import boundaries, each checked in a fresh interpreter: what a module loads is what it costs."""

from __future__ import annotations

import json
import subprocess
import sys


def loaded_after(code: str) -> set[str]:
    """The names in sys.modules after running `code` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_metrics_is_a_leaf_that_imports_nothing_of_the_package() -> None:
    loaded = loaded_after("import edge_agent.metrics")
    assert {n for n in loaded if n.startswith("edge_agent")} == {"edge_agent", "edge_agent.metrics"}
