"""What the benchmarks that drive the CLI in child processes share: the child command and the record
of what produced a result (machine, library versions, the command line, the commit).

``streaming.py`` and ``barber_memory.py`` each run ``llmprune prune`` in its own process (its own
peak RSS) and write one JSON; both use these two pieces so their results carry the same provenance.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# The CLI as a child process of this interpreter (the repository's own src/ on PYTHONPATH, see
# ``child_env``), without relying on the ``llmprune`` console script being on PATH.
CLI = [sys.executable, "-c", "import sys; from llmprune.cli import app; sys.argv = ['llmprune', *sys.argv[1:]]; app()"]


def child_env() -> dict[str, str]:
    """The environment for a child that must import this checkout's llmprune."""
    return {**os.environ, "PYTHONPATH": str(REPO / "src")}


def provenance(script: str, versions: dict[str, str]) -> dict[str, Any]:
    """Machine, versions (as a child's report recorded them), this command line and the commit."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "machine": {"cpus": os.cpu_count(), "torch_threads": versions.get("torch_threads"),
                    "platform": platform.platform(), "load_average_at_end": os.getloadavg()},
        "versions": versions,
        "command": " ".join([f"benchmarks/{script}", *sys.argv[1:]]),
        "commit": commit.stdout.strip() or None,
    }
