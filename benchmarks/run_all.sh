#!/usr/bin/env bash
# Regenerate every section of docs/RESULTS.md (slow: minutes on a 2-core CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY benchmarks/baselines.py
$PY benchmarks/accuracy.py
$PY benchmarks/ptq_ablation.py
