#!/usr/bin/env bash
# Regenerate every section of docs/RESULTS.md, fastest first (about five hours on a 2-core CPU;
# the QAT suite, about 50 min per model, and the mixed-precision frontier, about 1.5 h, are most of it). Each script also runs alone; see its docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY benchmarks/baselines.py
$PY benchmarks/accuracy.py
$PY benchmarks/ptq_ablation.py
$PY benchmarks/step_cost.py --compile-quantizers
$PY benchmarks/eagl_speed.py
$PY benchmarks/export_engine.py
$PY benchmarks/export_speed.py
$PY benchmarks/qat.py --models resnet20,vgg,mobilenet,mlp
$PY benchmarks/mixed_frontier.py --model resnet20 --budgets 0.5 --precisions 4,3,2 --steps 600 --alps-steps 50 \
    --random-draws 3 --additivity 4 --no-distill
