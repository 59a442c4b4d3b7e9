#!/usr/bin/env bash
# Create an isolated virtual environment holding the peer tool llm-compressor
# (PyPI `llmcompressor` 0.14.x) for side-by-side benchmarks. It is never a
# dependency of llmprune: llmcompressor pins transformers<=5.17, which conflicts
# with the project's own environment.
#
# Usage: bash benchmarks/setup_peer.sh
#   PEER_VENV   venv location (default: <repo>/.venv-peer)
#   PYTHON      interpreter used to create the venv (default: python3)
# Idempotent: if the venv already imports llmcompressor 0.14.x it does nothing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
venv="${PEER_VENV:-$repo/.venv-peer}"
python="${PYTHON:-python3}"
py="$venv/bin/python"

check() {
    [ -x "$py" ] && "$py" - <<'PY' >/dev/null 2>&1
import importlib.metadata as m
import llmcompressor, compressed_tensors, transformers, torch, datasets  # noqa: F401
assert m.version("llmcompressor").startswith("0.14.")
assert m.version("torch").startswith("2.13.0")
PY
}

# pip, quiet; its output goes to stderr (stdout is kept for the final path),
# minus this machine's harmless "Location ... is ignored" index warnings.
pip_install() {
    "$py" -m pip install --quiet "$@" 2>&1 |
        { grep -v 'is ignored: it is neither a file nor a directory' >&2 || true; }
}

if check; then
    echo "peer venv already set up: $venv" >&2
else
    if [ ! -x "$py" ]; then
        echo "creating peer venv at $venv" >&2
        "$python" -m venv "$venv"
    fi
    pip_install --upgrade pip
    # torch first, pinned: the local CPU build. A plain `torch` requirement
    # would otherwise pull a multi-GB CUDA build.
    pip_install "torch==2.13.0"
    # Keep torch pinned while resolving llmcompressor; pip picks a transformers
    # version within llmcompressor's own bounds.
    pip_install "llmcompressor==0.14.*" "torch==2.13.0"
    if ! check; then
        echo "error: llmcompressor did not install correctly into $venv" >&2
        exit 1
    fi
fi

"$py" - <<'PY' >&2
import importlib.metadata as m
print("  " + ", ".join(f"{p} {m.version(p)}" for p in
      ("llmcompressor", "compressed-tensors", "transformers", "torch", "datasets")))
PY
echo "$py"
