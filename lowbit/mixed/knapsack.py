"""The budget solver: an exact knapsack over discretised costs, and the additivity check.

EAGL and ALPS give each candidate layer a *gain* for each precision (how much is kept by not
going to the lowest one; 0 at the lowest). Assuming gains add up across layers (the paper's
assumption, checked by :func:`additivity_check`), the best assignment within a budget solves

    maximise  sum_l gain_l(p_l)    subject to   sum_l cost_l(p_l) <= budget

With two precisions (default W4A4 / W2A2) this is the 0-1 knapsack "which layers stay at 4
bits"; with more it is the multiple-choice knapsack (each layer picks exactly one precision),
solved by the same dynamic programme.

Discretisation: costs are bit-operations or stored bits, i.e. integers. The costs above each
layer's cheapest option are divided by their greatest common divisor; when the budget then
spans at most ``max_units`` units, the DP is exact (``exact=True``). Otherwise costs are
rounded *up* to ``resolution`` units of the budget, so the answer never exceeds the budget but
may leave some of it unused (``exact=False``). Ties go to the cheaper option.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lowbit.errors import RecipeError


@dataclass
class KnapsackSolution:
    choice: list[int]        # option index of each item
    value: float             # total value of the chosen options
    cost: float              # total (true, undiscretised) cost
    capacity: float          # the budget
    exact: bool              # True: integer costs solved without rounding
    units: int               # DP cells used for the capacity


def _integral(x: np.ndarray) -> bool:
    return bool(np.all(np.abs(x - np.round(x)) <= 1e-9 * np.maximum(1.0, np.abs(x))))


def solve_knapsack(values: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], capacity: float, *,
                   max_units: int = 2_000_000, resolution: int = 100_000) -> KnapsackSolution:
    """Pick one option per item maximising total value with total cost <= ``capacity``.

    ``values[i][j]``, ``costs[i][j]``: value and cost of option ``j`` of item ``i`` (costs >= 0).
    Raises :class:`RecipeError` when even the cheapest options exceed the capacity.
    """
    if len(values) != len(costs) or any(len(v) != len(c) or not v for v, c in zip(values, costs)):
        raise ValueError("values and costs must have the same, non-empty, option lists per item")
    n = len(values)
    vals = [np.asarray(v, dtype=np.float64) for v in values]
    cs = [np.asarray(c, dtype=np.float64) for c in costs]
    if any(np.any(c < 0) or not np.all(np.isfinite(c)) for c in cs) or any(not np.all(np.isfinite(v)) for v in vals):
        raise ValueError("costs must be finite and >= 0, values finite")
    base = float(sum(c.min() for c in cs))
    cap = float(capacity) - base
    if cap < -1e-9 * max(1.0, abs(base)):
        raise RecipeError(f"budget {capacity:,.0f} is below the cheapest assignment's cost {base:,.0f}")
    if cap <= 1e-9 * max(1.0, abs(base)):  # at the cheapest cost up to float rounding: nothing extra fits
        cap = 0.0
    extra = [c - c.min() for c in cs]
    everything = np.concatenate(extra) if n else np.zeros(0)
    exact = False
    if n and _integral(everything):
        ints = np.round(everything).astype(np.int64)
        g = 0
        for x in ints.tolist():
            g = math.gcd(g, x)
        g = max(g, 1)
        cap_units = math.floor(cap / g + 1e-9)
        top = sum(int(np.round(e.max())) // g for e in extra)
        if min(cap_units, top) <= max_units:
            units = [np.round(e).astype(np.int64) // g for e in extra]
            C, exact = min(cap_units, top), True
    if not exact:
        if cap == 0.0:
            units = [np.where(e > 0, np.iinfo(np.int64).max // 4, 0) for e in extra]
            C = 0
        else:
            scale = cap / resolution
            # an option dearer than the whole budget never fits: clamp before the int cast (no overflow)
            units = [np.minimum(np.ceil(e / scale - 1e-9), resolution + 1).astype(np.int64) for e in extra]
            C = min(resolution, int(sum(u.max() for u in units)))
    dp = np.zeros(C + 1)
    choice = np.zeros((n, C + 1), dtype=np.int32)
    for i in range(n):
        order = np.argsort(units[i], kind="stable")  # cheapest first: ties stay with the cheaper option
        new = np.full(C + 1, -np.inf)
        pick = np.zeros(C + 1, dtype=np.int32)
        for j in order:
            u = int(units[i][j])
            if u > C:
                continue
            cand = np.full(C + 1, -np.inf)
            cand[u:] = dp[:C + 1 - u] + vals[i][j]
            better = cand > new
            new[better], pick[better] = cand[better], j
        dp, choice[i] = new, pick
    chosen = [0] * n
    c = C
    for i in reversed(range(n)):
        j = int(choice[i][c])
        chosen[i] = j
        c -= int(units[i][j])
    value = float(sum(vals[i][j] for i, j in enumerate(chosen)))
    total = float(sum(cs[i][j] for i, j in enumerate(chosen)))
    return KnapsackSolution(chosen, value, total, float(capacity), exact, C)


def select_assignment(space, gains: dict[str, Sequence[float]], budget, *, absolute: bool = False,
                      **solver_options) -> tuple[dict, KnapsackSolution]:
    """The assignment of ``space``'s candidates maximising total gain within ``budget``.

    ``gains[layer][k]``: value of ``space.precisions[k]`` for that layer (0 at the lowest).
    ``budget``: a fraction of the all-highest cost (or cost units with ``absolute=True``).
    """
    capacity = space.absolute_budget(budget, absolute=absolute)
    missing = [n for n in space.candidates if n not in gains]
    if missing:
        raise RecipeError(f"no gain for candidate layer(s) {missing[:5]}")
    fixed_cost = space.costs.cost(space.fixed, space.metric)
    values = [list(gains[n]) for n in space.candidates]
    if any(len(v) != len(space.precisions) for v in values):
        raise RecipeError(f"each layer needs one gain per candidate precision ({len(space.precisions)})")
    sol = solve_knapsack(values, space.option_costs(), capacity - fixed_cost, **solver_options)
    sol.cost += fixed_cost
    sol.capacity = capacity
    return {n: space.precisions[j] for n, j in zip(space.candidates, sol.choice)}, sol


def random_assignment(space, budget, *, seed: int = 0, absolute: bool = False) -> dict:
    """A random selection within ``budget``: candidates in random order, each raised to the
    highest precision that still fits (the rest stay at the lowest). Filling in random order
    uses the budget about as fully as the knapsack does, so costs compare."""
    capacity = space.absolute_budget(budget, absolute=absolute)
    rng = random.Random(seed)
    assignment = space.uniform(space.lowest)
    spent = space.cost(assignment)
    order = list(space.candidates)
    rng.shuffle(order)
    for n in order:
        layer = space.costs.layers[n]
        for p in space.precisions:  # most expensive first
            extra = layer.cost(p, space.metric) - layer.cost(assignment[n], space.metric)
            if spent + extra <= capacity:
                assignment[n] = p
                spent += extra
                break
    return assignment


def additivity_check(space, single_drops: dict[str, float], measure: Callable[[dict], float], base_value: float,
                     *, combos: int | list[list[str]] = 4, sizes: Sequence[int] = (2, 3), seed: int = 0) -> dict:
    """Compare the predicted drop of lowering several layers together (the sum of their
    single-layer drops) with the measured one, on held-out combinations.

    ``single_drops[layer]``: measured drop of lowering only that layer to the lowest precision.
    ``measure(assignment) -> value`` (e.g. accuracy after the same short fine-tune);
    ``base_value``: the value of the all-highest assignment. ``combos``: how many random
    combinations (sizes cycling through ``sizes``) or explicit lists of layer names.
    Returns ``{"rows": [...], "pearson_r", "mean_abs_error", "mean_predicted", "mean_measured"}``.
    """
    rng = random.Random(seed)
    if isinstance(combos, int):
        chosen = []
        pool = [n for n in space.candidates if n in single_drops]
        for k in range(combos):
            size = min(sizes[k % len(sizes)], len(pool))
            chosen.append(sorted(rng.sample(pool, size), key=space.candidates.index))
    else:
        chosen = [list(c) for c in combos]
    rows = []
    for combo in chosen:
        assignment = space.uniform(space.highest)
        for n in combo:
            assignment[n] = space.lowest
        measured = base_value - measure(assignment)
        predicted = float(sum(single_drops[n] for n in combo))
        rows.append({"layers": combo, "predicted_drop": predicted, "measured_drop": measured,
                     "error": measured - predicted})
    pred = np.array([r["predicted_drop"] for r in rows])
    meas = np.array([r["measured_drop"] for r in rows])
    r = float(np.corrcoef(pred, meas)[0, 1]) if len(rows) > 1 and pred.std() > 0 and meas.std() > 0 else float("nan")
    return {"rows": rows, "pearson_r": r, "mean_abs_error": float(np.mean(np.abs(meas - pred))) if rows else 0.0,
            "mean_predicted": float(pred.mean()) if rows else 0.0, "mean_measured": float(meas.mean()) if rows else 0.0}
