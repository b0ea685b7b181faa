#!/usr/bin/env bash
# Regenerate every section of docs/RESULTS.md, fastest first (about two hours on a 2-core CPU;
# the QAT suite is most of it). Each script also runs alone; see its docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY benchmarks/baselines.py
$PY benchmarks/accuracy.py
$PY benchmarks/ptq_ablation.py
$PY benchmarks/step_cost.py
$PY benchmarks/eagl_speed.py
$PY benchmarks/export_engine.py
$PY benchmarks/export_speed.py
$PY benchmarks/qat.py --models resnet20
$PY benchmarks/mixed_frontier.py --model resnet20 --budgets 0.5 --steps 160 --alps-steps 30 --no-distill
