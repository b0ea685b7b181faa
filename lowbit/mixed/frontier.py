"""Selection by budget and the accuracy-cost frontier.

:func:`select` gives one :class:`Selection` (an assignment within a budget) for a method:

- ``eagl``: entropy gains (no data), then the knapsack;
- ``alps``: one short fine-tune per candidate layer and lower precision, then the knapsack;
- ``random``: candidates in random order raised while the budget allows (seeded);
- ``uniform``: the most expensive uniform candidate precision within the budget.

:func:`run_frontier` sweeps budgets: for each, the method's assignment is saved as a recipe
YAML (``recipes/<method>-<budget>.yaml``, readable by ``lowbit ptq``/``lowbit qat``), quantized,
fine-tuned for ``steps`` steps with the base recipe's ``qat:`` settings, and evaluated on the
test data; the same is done for ``random_draws`` random selections at the same cost (their mean
is the baseline) and for uniform 2/3/4-bit models (first/last layers fixed). It writes
``frontier.json``, ``frontier.md`` (the table) and ``frontier.png`` (accuracy against cost).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from lowbit.errors import RecipeError
from lowbit.files import write_json_atomic, write_text_atomic
from lowbit.mixed.alps import alps_gains
from lowbit.mixed.cost import Precision, parse_precision, precision_label
from lowbit.mixed.eagl import eagl_entropies, eagl_gains
from lowbit.mixed.knapsack import KnapsackSolution, additivity_check, random_assignment, select_assignment
from lowbit.mixed.tune import frozen_teacher, train_and_evaluate
from lowbit.plot import pyplot

METHODS = ("eagl", "alps", "random", "uniform")


@dataclass
class Selection:
    """A chosen assignment: ``assignment`` (candidate -> precision), its cost and where it came from."""

    method: str
    budget: float                      # as asked (a fraction of the all-high cost unless absolute)
    assignment: dict[str, Precision]
    cost: int
    fraction: float                    # cost / all-highest cost
    space: object
    gains: dict[str, list[float]] = field(default_factory=dict)
    solution: KnapsackSolution | None = None
    seconds: float = 0.0               # time to select (gains + solver)
    info: dict = field(default_factory=dict)

    def full_assignment(self) -> dict[str, Precision]:
        """Every quantized layer's precision, fixed first/last layers included."""
        return self.space.full(self.assignment)

    def recipe(self, name: str | None = None):
        """The assignment as a :class:`~lowbit.recipe.Recipe` (one override per layer)."""
        meta = {"method": self.method, "budget": self.budget}
        if self.gains:
            meta["gains"] = {n: [round(float(x), 6) for x in g] for n, g in self.gains.items()}
        meta.update(self.info)
        return self.space.recipe_for(self.assignment, name=name or f"{self.method}-{self.fraction:.3f}", meta=meta)

    def save(self, path) -> Path:
        """Write the assignment's recipe YAML (``lowbit ptq --recipe PATH`` / ``lowbit qat`` read it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.recipe(name=path.stem).save(path)
        return path

    def totals(self) -> dict:
        return self.space.totals(self.assignment)

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for p in self.assignment.values():
            counts[precision_label(p)] = counts.get(precision_label(p), 0) + 1
        mix = ", ".join(f"{c} at {k}" for k, c in sorted(counts.items(), reverse=True))
        return (f"{self.method} selection: {mix}; {self.space.metric} {self.cost:,} "
                f"({self.fraction:.3f} of all-{precision_label(self.space.highest)}), {self.seconds:.3f} s")


def compute_gains(method: str, model: nn.Module, space, *, weighting="none", qmodel=None, alps=None,
                  shard=None) -> tuple[dict[str, list[float]], dict]:
    """Gains of ``method`` (eagl or alps) and information about how they were obtained."""
    if method == "eagl":
        start = time.perf_counter()
        entropies = eagl_entropies(model, space, qmodel=qmodel)
        gains = eagl_gains(model, space, weighting=weighting, entropies=entropies)
        name = weighting if isinstance(weighting, str) else getattr(weighting, "__name__", "callable")
        return gains, {"entropies": {n: round(h, 6) for n, h in entropies.items()}, "weighting": name,
                       "gain_seconds": round(time.perf_counter() - start, 4)}
    if method == "alps":
        if alps is None:
            raise RecipeError("ALPS needs training and evaluation data (train_data, eval_data)")
        result = alps.run(shard)
        gains = alps_gains(result)
        return gains, {"alps_steps_per_run": result.steps_per_run, "alps_runs": result.runs,
                       "alps_steps_total": result.steps_total, "alps_seconds_total": result.seconds_total,
                       "alps_trained_now": result.trained_now, "alps_base_accuracy": result.base_accuracy,
                       "alps_cache": result.cache_dir}
    raise RecipeError(f"gains exist for eagl and alps, not {method!r}")


def select(space, budget, method: str = "eagl", *, gains: dict[str, list[float]] | None = None,
           absolute: bool = False, seed: int = 0, model: nn.Module | None = None, weighting="none", qmodel=None,
           alps=None, info: dict | None = None) -> Selection:
    """One :class:`Selection` of ``space`` within ``budget`` by ``method`` (see the module docstring)."""
    if method not in METHODS:
        raise RecipeError(f"method must be one of {list(METHODS)}, got {method!r}")
    start = time.perf_counter()
    capacity = space.absolute_budget(budget, absolute=absolute)
    info = dict(info or {})
    solution = None
    if method in ("eagl", "alps"):
        if gains is None:
            if model is None:
                raise RecipeError(f"{method} needs the float model (or precomputed gains)")
            gains, more = compute_gains(method, model, space, weighting=weighting, qmodel=qmodel, alps=alps)
            info.update(more)
        assignment, solution = select_assignment(space, gains, capacity, absolute=True)
        info["solver_exact"] = solution.exact
    elif method == "random":
        assignment = random_assignment(space, capacity, seed=seed, absolute=True)
        info["seed"] = seed
    else:
        fits = [p for p in space.precisions if space.cost(space.uniform(p)) <= capacity]
        assignment = space.uniform(fits[0])  # the lowest always fits (absolute_budget checked the range)
    cost = space.cost(assignment)
    return Selection(method, budget, assignment, cost, cost / space.bounds()[1], space, gains or {}, solution,
                     round(time.perf_counter() - start, 4), info)


# ----- the frontier ------------------------------------------------------------------------
def _budget_tag(b: float) -> str:
    return f"{b:.3f}".rstrip("0").rstrip(".")


def run_frontier(model: nn.Module, space, *, method: str, budgets: Sequence[float], train_data,
                 test_data: Iterable, calib_data: Iterable | None = None, steps: int = 200, out_dir="mixed-frontier",
                 random_draws: int = 3, uniform_bits: Sequence = (2, 3, 4), seed: int = 0,
                 eval_batches: int | None = None, config=None, weighting="none", alps=None, gains=None,
                 additivity: int = 0, select_only: bool = False, model_name: str = "",
                 log: Callable[[str], None] = print) -> dict:
    """Sweep ``budgets`` (fractions of the all-high cost) with ``method``; fine-tune and evaluate
    each assignment, ``random_draws`` random ones at equal cost and uniform models; write
    ``frontier.json``, ``frontier.md``, ``frontier.png`` and the recipes into ``out_dir``.

    ``select_only``: write the recipes and the selection table without fine-tuning anything.
    ``additivity``: with ALPS, also measure that many held-out combinations of lowered layers.
    Returns the results dict written to ``frontier.json``.
    """
    if method not in METHODS:
        raise RecipeError(f"method must be one of {list(METHODS)}, got {method!r}")
    if random_draws < 0:
        raise RecipeError(f"random_draws must be >= 0, got {random_draws}")
    for b in budgets:
        space.absolute_budget(b)  # every budget checked before any training
    uniform = [parse_precision(b) for b in uniform_bits]
    out = Path(out_dir)
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    teacher = frozen_teacher(model)
    hi_cost = space.bounds()[1]
    results = {"model": model_name, "method": method, "metric": space.metric, "steps": steps, "seed": seed,
               "precisions": [precision_label(p) for p in space.precisions],
               "fixed": {n: precision_label(p) for n, p in space.fixed.items()},
               "candidates": list(space.candidates), "all_high_cost": hi_cost, "points": []}
    gain_info: dict = {}
    if method in ("eagl", "alps") and gains is None:
        gains, gain_info = compute_gains(method, model, space, weighting=weighting, alps=alps)
    results["gains"] = {n: [round(float(x), 6) for x in g] for n, g in (gains or {}).items()}
    results["gain_info"] = gain_info

    def evaluate_point(kind: str, label: str, assignment: dict, budget, path: Path, extra: dict | None = None):
        recipe = space.recipe_for(assignment, name=path.stem, meta={"method": kind, "budget": budget})
        recipe.save(path)
        point = {"kind": kind, "label": label, "budget": budget, "cost": space.cost(assignment),
                 "fraction": space.cost(assignment) / hi_cost, "mean_w_bits": space.totals(assignment)["mean_w_bits"],
                 "recipe": str(path.relative_to(out))}
        point.update(extra or {})
        if not select_only:
            r = train_and_evaluate(model, recipe, train_data, test_data, steps=steps, calib_data=calib_data,
                                   teacher=teacher, config=config, seed=seed, eval_batches=eval_batches)
            point.update(accuracy=r["accuracy"], steps=r["steps"], seconds=round(r["seconds"], 2))
            log(f"{label}: {point['fraction']:.3f} of all-{precision_label(space.highest)} {space.metric}, "
                f"top-1 {r['accuracy']:.2f}% ({r['steps']} steps, {r['seconds']:.0f} s)")
        else:
            log(f"{label}: {point['fraction']:.3f} of all-{precision_label(space.highest)} {space.metric} -> {path}")
        return point

    def random_points(budget_abs: float, tag: str, budget) -> dict:
        draws = []
        for d in range(random_draws):
            a = random_assignment(space, budget_abs, seed=seed + 1000 * d + 1, absolute=True)
            draws.append(evaluate_point("random-draw", f"random {tag} draw {d}", a, budget,
                                        out / "recipes" / f"random-{tag}-draw{d}.yaml"))
        accs = [p["accuracy"] for p in draws if "accuracy" in p]
        summary = {"kind": "random", "label": f"random {tag} (mean of {len(draws)})", "budget": budget,
                   "cost": statistics.mean(p["cost"] for p in draws),
                   "fraction": statistics.mean(p["fraction"] for p in draws),
                   "mean_w_bits": statistics.mean(p["mean_w_bits"] for p in draws), "draws": draws}
        if accs:
            summary.update(accuracy=statistics.mean(accs), accuracy_std=statistics.pstdev(accs),
                           steps=sum(p["steps"] for p in draws), seconds=round(sum(p["seconds"] for p in draws), 2))
        return summary

    for b in budgets:
        tag = _budget_tag(b)
        if method in ("eagl", "alps"):
            sel = select(space, b, method, gains=gains)
            point = evaluate_point(method, f"{method} {tag}", sel.assignment, b,
                                   out / "recipes" / f"{method}-{tag}.yaml",
                                   {"solver_exact": sel.solution.exact, "select_seconds": sel.seconds})
            results["points"].append(point)
            if random_draws:
                results["points"].append(random_points(point["cost"], tag, b))
        elif method == "random" and random_draws:
            results["points"].append(random_points(space.absolute_budget(b), tag, b))
    for p in uniform:
        assignment = space.uniform(p)
        results["points"].append(evaluate_point("uniform", f"uniform {precision_label(p)}", assignment, None,
                                                out / "recipes" / f"uniform-{precision_label(p)}.yaml"))
    if additivity and method == "alps" and alps is not None and not select_only:
        res = alps.run()
        results["additivity"] = additivity_check(space, res.drops(), alps.measure_assignment, res.base_accuracy,
                                                 combos=additivity, seed=seed)
    write_json_atomic(out / "frontier.json", results)
    table = frontier_table(results)
    write_text_atomic(out / "frontier.md", table + "\n")
    plot = None if select_only else write_frontier_plot(results, out / "frontier.png")
    log(table)
    log(f"wrote {out / 'frontier.json'}, {out / 'frontier.md'}" + (f", {plot}" if plot else ""))
    return results


def frontier_table(results: dict) -> str:
    """Markdown table of the frontier points (random draws folded into their mean)."""
    ref = next((p.get("accuracy") for p in results["points"]
                if p["kind"] == "uniform" and p["label"].endswith(results["precisions"][0])), None)
    unit = "bit-ops" if results["metric"] == "bitops" else "stored bits"
    head = (f"| point | {unit} (fraction of all-{results['precisions'][0]}) | mean weight bits | top-1 (%) | "
            f"vs uniform {results['precisions'][0]} | fine-tune steps | seconds |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for p in results["points"]:
        acc = p.get("accuracy")
        spread = f" ± {p['accuracy_std']:.2f}" if "accuracy_std" in p else ""
        acc_s = "—" if acc is None else f"{acc:.2f}{spread}"
        delta = "—" if acc is None or ref is None else f"{acc - ref:+.2f}"
        lines.append(f"| {p['label']} | {p['cost']:,.0f} ({p['fraction']:.3f}) | {p['mean_w_bits']:.2f} | {acc_s} | "
                     f"{delta} | {p.get('steps', '—')} | {p.get('seconds', '—')} |")
    return "\n".join(lines)


def write_frontier_plot(results: dict, path: Path) -> Path | None:
    """Accuracy against cost fraction: the method's frontier, random means (with spread), uniform points."""
    plt = pyplot()
    if plt is None:
        return None
    pts = [p for p in results["points"] if "accuracy" in p]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    method = []
    for kind, style in (("eagl", "o-"), ("alps", "^-")):
        series = sorted((p for p in pts if p["kind"] == kind), key=lambda p: p["fraction"])
        if series:
            ax.plot([p["fraction"] for p in series], [p["accuracy"] for p in series], style, label=kind.upper())
            method += series
    rand = sorted((p for p in pts if p["kind"] == "random"), key=lambda p: p["fraction"])
    if rand:
        ax.errorbar([p["fraction"] for p in rand], [p["accuracy"] for p in rand],
                    yerr=[p.get("accuracy_std", 0.0) for p in rand], fmt="s--", color="grey", capsize=3,
                    label="random (mean ± sd)")
    for p in (p for p in pts if p["kind"] == "uniform"):
        ax.scatter(p["fraction"], p["accuracy"], marker="D", color="black", zorder=3)
        ax.annotate(p["label"].replace("uniform ", ""), (p["fraction"], p["accuracy"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    ax.set_xlabel(f"{'bit-operations' if results['metric'] == 'bitops' else 'stored weight bits'} "
                  f"(fraction of all-{results['precisions'][0]})")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{results.get('model', '')} accuracy-cost frontier ({results['steps']} fine-tune steps)".strip())
    ax.grid(alpha=0.3)
    if method or rand:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
