"""The budget solver against brute force, the random baseline and the additivity check."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.errors import RecipeError
from lowbit.mixed import (
    additivity_check,
    build_space,
    random_assignment,
    select_assignment,
    solve_knapsack,
)

torch.set_num_threads(1)


def brute_force(values, costs, capacity):
    best = None
    for combo in itertools.product(*(range(len(v)) for v in values)):
        cost = sum(costs[i][j] for i, j in enumerate(combo))
        if cost <= capacity:
            value = sum(values[i][j] for i, j in enumerate(combo))
            best = value if best is None else max(best, value)
    return best


@st.composite
def instances(draw, max_options=3):
    n = draw(st.integers(1, 7))
    k = draw(st.integers(2, max_options))
    costs = [draw(st.lists(st.integers(0, 40), min_size=k, max_size=k)) for _ in range(n)]
    values = [draw(st.lists(st.floats(-5, 10, allow_nan=False, width=32), min_size=k, max_size=k))
              for _ in range(n)]
    lo = sum(min(c) for c in costs)
    hi = sum(max(c) for c in costs)
    capacity = draw(st.integers(lo, hi))
    return values, costs, capacity


@settings(max_examples=150, deadline=None)
@given(instances())
def test_matches_brute_force(inst):
    values, costs, capacity = inst
    sol = solve_knapsack(values, costs, capacity)
    assert sol.exact
    assert sol.cost <= capacity
    assert sol.cost == sum(costs[i][j] for i, j in enumerate(sol.choice))
    assert sol.value == pytest.approx(brute_force(values, costs, capacity), abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(instances(max_options=2), st.integers(1, 10**6))
def test_zero_one_with_scaled_costs(inst, factor):
    """Costs with a common factor (bit-operations are MACs x bits): divided out, same optimum."""
    values, costs, capacity = inst
    sol = solve_knapsack(values, [[c * factor for c in cs] for cs in costs], capacity * factor + factor // 2)
    assert sol.exact and sol.units <= sum(max(c) - min(c) for c in costs)
    assert sol.value == pytest.approx(brute_force(values, costs, capacity), abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(instances())
def test_non_integer_costs_stay_within_budget(inst):
    values, costs, capacity = inst
    fcosts = [[c * 0.37 + 0.011 * j for j, c in enumerate(cs)] for cs in costs]
    cap = capacity * 0.37 + 0.011 * (len(costs[0]) - 1) * len(costs)  # >= the cheapest assignment
    sol = solve_knapsack(values, fcosts, cap, resolution=5000)
    assert sol.cost <= cap + 1e-9
    assert sol.value <= brute_force(values, fcosts, cap) + 1e-6


def test_ties_go_to_the_cheaper_option_and_infeasible_raises():
    sol = solve_knapsack([[0.0, 0.0]], [[5, 1]], 10)
    assert sol.choice == [1]
    with pytest.raises(RecipeError, match="below"):
        solve_knapsack([[1.0, 0.0]], [[5, 3]], 2)


class Net(nn.Module):
    def __init__(self, widths=(8, 16, 16, 16, 16, 16, 2)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture
def space():
    return build_space(Net(), "lsq-w4a4", example_input=torch.zeros(1, 8))


def test_select_assignment_at_the_ends_of_the_range(space):
    gains = {n: [1.0 + i, 0.0] for i, n in enumerate(space.candidates)}
    lo, hi = space.bounds()
    high, sol = select_assignment(space, gains, 1.0)
    assert set(high.values()) == {(4, 4)} and sol.cost == hi
    low, sol = select_assignment(space, gains, lo / hi)
    assert set(low.values()) == {(2, 2)} and sol.cost == lo
    # all candidates cost the same here: a budget for k of them keeps the k largest gains
    one = space.costs.layers[space.candidates[0]]
    step = one.bitops((4, 4)) - one.bitops((2, 2))
    mixed, _ = select_assignment(space, gains, lo + 2 * step, absolute=True)
    assert [n for n, p in mixed.items() if p == (4, 4)] == space.candidates[-2:]


def test_random_assignment_fills_the_budget_reproducibly(space):
    lo, hi = space.bounds()
    budget = lo + 0.5 * (hi - lo)
    a = random_assignment(space, budget, seed=3, absolute=True)
    assert a == random_assignment(space, budget, seed=3, absolute=True)
    assert space.cost(a) <= budget
    one = space.costs.layers[space.candidates[0]]
    assert budget - space.cost(a) < one.bitops((4, 4)) - one.bitops((2, 2))  # nothing else would fit
    draws = {tuple(sorted(random_assignment(space, budget, seed=s, absolute=True).items())) for s in range(8)}
    assert len(draws) > 1


def test_additivity_check(space):
    drops = {n: 0.5 * (i + 1) for i, n in enumerate(space.candidates)}

    def additive(assignment):
        return 90.0 - sum(drops[n] for n, p in assignment.items() if p == (2, 2))

    res = additivity_check(space, drops, additive, 90.0, combos=4, sizes=(2, 3), seed=1)
    assert len(res["rows"]) == 4 and res["mean_abs_error"] == pytest.approx(0.0, abs=1e-9)
    assert res["pearson_r"] == pytest.approx(1.0)
    assert all(len(r["layers"]) in (2, 3) for r in res["rows"])

    def interacting(assignment):  # lowering layers together costs more than the sum
        k = sum(p == (2, 2) for p in assignment.values())
        return additive(assignment) - 0.25 * k * (k - 1)

    res = additivity_check(space, drops, interacting, 90.0, combos=[space.candidates[:2]])
    assert res["rows"][0]["error"] == pytest.approx(0.5)


@pytest.mark.parametrize("costs", [[[11, 2], [25, 24]], [[25, 24], [11, 2]], [[3, 2], [32, 24]]])
def test_budget_equal_to_the_cheapest_cost_up_to_rounding(costs):
    """Float costs whose budget is the cheapest assignment's cost up to rounding (found by hypothesis):
    the solver returns the cheapest assignment, never an overflowed or over-budget one."""
    fcosts = [[c * 0.37 + 0.011 * j for j, c in enumerate(cs)] for cs in costs]
    cheapest = sum(min(cs) for cs in fcosts)
    for budget in (cheapest, cheapest * (1 + 1e-15), 26 * 0.37 + 0.011 * 2):  # the last: the test's own sum
        sol = solve_knapsack([[0.0, 0.0], [0.0, 0.0]], fcosts, budget, resolution=5000)
        assert sol.cost <= max(budget, cheapest) + 1e-9
        assert sol.cost == pytest.approx(cheapest)
    tiny = solve_knapsack([[1.0, 0.0], [1.0, 0.0]], [[1000.0, 0.0], [1000.0, 0.0]], 1e-6, resolution=5000)
    assert tiny.choice == [1, 1] and tiny.cost == 0.0
