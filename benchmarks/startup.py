"""Start-up time of the command line: `llmprune --help`, `--version` and `prune --help`, each in a fresh process.

Goal (issue 28): `llmprune --help` <= 0.5 s. Writes benchmarks/results/startup/startup.json with the
median and the spread of ``--repeats`` runs per command, and whether torch was imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "startup" / "startup.json"
COMMANDS = (["--help"], ["--version"], ["prune", "--help"])


def entry_point() -> list[str]:
    exe = shutil.which("llmprune", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-c", "from llmprune.cli import main; main()"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--output", type=Path, default=OUT)
    args = ap.parse_args()
    base = entry_point()
    subprocess.run([*base, "--version"], capture_output=True, check=True)  # warm the file cache once
    results = {}
    for command in COMMANDS:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run([*base, *command], capture_output=True, check=True)
            times.append(time.perf_counter() - t0)
        results[" ".join(command)] = {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
                                      "max_s": round(max(times), 4), "runs": len(times)}
        print(command, results[" ".join(command)], flush=True)
    probe = subprocess.run([sys.executable, "-c", "import sys, llmprune.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    from llmprune.report import versions

    data = {"benchmark": "startup", "goal": {"llmprune --help": "<= 0.5 s"},
            "protocol": {"what": "wall time of a fresh process per run, file cache warm", "repeats": args.repeats,
                         "entry_point": Path(base[0]).name, "threads": os.cpu_count()},
            "results": results, "imports_torch": probe.stdout.strip() == "True",
            "machine": {"python": platform.python_version(), "torch_threads": os.cpu_count()}, "versions": versions()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(args.output)
    print("wrote", args.output)


if __name__ == "__main__":
    main()
