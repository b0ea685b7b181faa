"""The search space of a mixed-precision selection: which layers are candidates, at which precisions.

:func:`build_space` resolves a base recipe on a float model (``lowbit.prepare.resolve_plan``),
fixes the first and last layers (default W8A8, the LSQ/EAGL convention), makes every other
layer whose weights and activations are both quantized a *candidate* for each of the candidate
precisions (default ``{4, 2}``: W4A4 or W2A2), checks that the base recipe's quantizers can
run at each candidate precision, and counts costs (:mod:`lowbit.mixed.cost`).

An *assignment* maps candidate layer names to precisions ``(w_bits, a_bits)``;
:meth:`SearchSpace.recipe_for` turns one into a recipe with one override per layer name (first
and last layers included), which ``lowbit.quantize``, ``lowbit ptq`` and ``lowbit qat`` read
like any recipe. Budgets are fractions of the all-highest-precision cost (the uniform
high-precision model, fixed layers included) unless ``absolute=True``.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field

from torch import nn

from lowbit.errors import RecipeError
from lowbit.mixed.cost import (
    CostModel,
    Precision,
    check_metric,
    parse_precision,
    precision_label,
)
from lowbit.nn.modules import QuantMixin
from lowbit.prepare import build_quantizer, match_layers, resolve_plan
from lowbit.recipe import FIRST, LAST, Recipe, load_recipe

DEFAULT_PRECISIONS = (4, 2)
DEFAULT_FIXED = (FIRST, LAST)
FLOAT_BITS = 32  # a side left float counts as 32 bits in costs


def sort_precisions(precisions) -> list[Precision]:
    """Distinct precisions, most expensive first (by ``w * a``, then ``w``)."""
    ps = sorted({parse_precision(p) for p in precisions}, key=lambda p: (p[0] * p[1], p[0], p[1]), reverse=True)
    if len(ps) < 2:
        raise RecipeError(f"mixed precision needs at least two candidate precisions, got {list(precisions)!r}")
    return ps


def glob_escape(name: str) -> str:
    """A recipe pattern matching exactly ``name`` (glob characters bracketed)."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


@dataclass
class SearchSpace:
    """Candidates, fixed layers, precisions (most expensive first), costs, and the resolved base specs."""

    recipe: Recipe
    costs: CostModel
    candidates: list[str]
    fixed: dict[str, Precision]
    precisions: list[Precision]
    metric: str
    specs: dict[str, tuple[dict | None, dict | None]] = field(default_factory=dict)
    fixed_bits: int | None = 8

    # ----- assignments -------------------------------------------------------------------
    @property
    def highest(self) -> Precision:
        return self.precisions[0]

    @property
    def lowest(self) -> Precision:
        return self.precisions[-1]

    def uniform(self, p) -> dict[str, Precision]:
        p = parse_precision(p)
        return {n: p for n in self.candidates}

    def full(self, assignment: dict) -> dict[str, Precision]:
        """Fixed layers plus ``assignment`` (which must give every candidate a precision)."""
        missing = [n for n in self.candidates if n not in assignment]
        unknown = [n for n in assignment if n not in self.candidates]
        if missing or unknown:
            raise RecipeError(f"an assignment gives each candidate layer a precision; missing {missing[:5]}, "
                              f"not candidates {unknown[:5]}; candidates are {self.candidates[:8]}...")
        return {**self.fixed, **{n: parse_precision(p) for n, p in assignment.items()}}

    def cost(self, assignment: dict, metric: str | None = None) -> int:
        """Total cost of the model under ``assignment`` (fixed layers included)."""
        return self.costs.cost(self.full(assignment), metric or self.metric)

    def totals(self, assignment: dict) -> dict:
        return self.costs.totals(self.full(assignment))

    def option_costs(self, metric: str | None = None) -> list[list[int]]:
        """Per candidate, the cost of each precision (aligned with :attr:`precisions`)."""
        metric = metric or self.metric
        return [[self.costs.layers[n].cost(p, metric) for p in self.precisions] for n in self.candidates]

    def bounds(self) -> tuple[int, int]:
        """``(all-lowest cost, all-highest cost)``: the feasible budget range."""
        return self.cost(self.uniform(self.lowest)), self.cost(self.uniform(self.highest))

    def absolute_budget(self, budget, *, absolute: bool = False) -> float:
        """The budget in cost units; a fraction of the all-highest cost unless ``absolute``."""
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget):
            raise RecipeError(f"a budget is a number (a fraction of the all-{precision_label(self.highest)} "
                              f"cost), got {budget!r}")
        lo, hi = self.bounds()
        value = float(budget) if absolute else float(budget) * hi
        if value < lo * (1 - 1e-12) or value > hi * (1 + 1e-12):
            unit = "bit-operations" if self.metric == "bitops" else "stored weight bits"
            asked = "" if absolute else f" (a fraction of the all-{precision_label(self.highest)} cost)"
            raise RecipeError(
                f"budget {budget!r}{asked} is outside the feasible range: from all candidates at "
                f"{precision_label(self.lowest)} "
                f"({lo:,} {unit}, fraction {lo / hi:.4f}) to all at {precision_label(self.highest)} "
                f"({hi:,} {unit}, fraction 1.0); first/last layers fixed at {self.fixed_bits or 'their recipe bits'}")
        return min(max(value, lo), hi)

    def fraction(self, assignment: dict) -> float:
        return self.cost(assignment) / self.bounds()[1]

    # ----- recipes -----------------------------------------------------------------------
    def recipe_for(self, assignment: dict, *, name: str | None = None, description: str | None = None,
                   meta: dict | None = None) -> Recipe:
        """The base recipe plus one override per quantized layer (fixed layers included).

        A ``mixed:`` section records the assignment (``layer: w4a4``), its cost, and ``meta``.
        """
        full = self.full(assignment)
        data = self.recipe.to_dict()
        layers = dict(data.get("layers") or {})
        for layer, (w, a) in full.items():
            w_spec, a_spec = self.specs[layer]
            override = {}
            if w_spec is not None:
                override["weights"] = {"bits": w}
            if a_spec is not None:
                override["activations"] = {"bits": a}
            key = glob_escape(layer)
            previous = layers.pop(key, None) or {}  # re-inserted last, so that it wins over every base pattern
            for side, spec in previous.items():
                if side in override and spec is not None:
                    override[side] = {**spec, **override[side]}
                elif side not in override:
                    override[side] = spec
            layers[key] = override
        data["layers"] = layers
        totals = self.costs.totals(full)
        hi = self.bounds()[1]
        cost = int(self.costs.cost(full, self.metric))
        section = {"metric": self.metric, "precisions": [precision_label(p) for p in self.precisions],
                   "cost": cost, "fraction": round(cost / hi, 6),
                   "bitops": int(totals["bitops"]), "size_bits": int(totals["size_bits"]),
                   "assignment": {n: precision_label(p) for n, p in full.items()}}
        section.update(meta or {})
        data["mixed"] = _plain(section)
        data["name"] = name or f"{self.recipe.sections.get('name', 'mixed')}-mixed"
        data["description"] = description or (
            f"Mixed-precision assignment over the base recipe {self.recipe.sections.get('name', '(unnamed)')!s}: "
            f"{section['fraction']:.3f} of the all-{precision_label(self.highest)} {self.metric} cost.")
        return Recipe.from_dict(data)

    def assignment_from_recipe(self, recipe) -> dict[str, Precision]:
        """The candidates' precisions a recipe resolves to (the inverse of :meth:`recipe_for`)."""
        recipe = load_recipe(recipe)
        plan, _ = resolve_plan(_FloatShape(self), recipe)
        out = {}
        for n in self.candidates:
            w, a = plan[n]
            out[n] = (w["bits"] if w else FLOAT_BITS, a["bits"] if a else FLOAT_BITS)
        return out

    def fingerprint(self) -> dict:
        """Plain data that identifies the space (for cache keys)."""
        return {"recipe": _plain(self.recipe.to_dict()), "candidates": self.candidates,
                "fixed": {n: list(p) for n, p in self.fixed.items()},
                "precisions": [list(p) for p in self.precisions], "metric": self.metric}


class _FloatShape(nn.Module):
    """A stand-in with the space's layer names, for resolving recipes without the real model."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        self._names = list(space.costs.layers)

    def named_modules(self, *args, **kwargs):
        yield "", self
        for n in self._names:
            yield n, nn.Linear(1, 1)


def _plain(obj):
    """JSON/YAML-safe copy (tuples become lists)."""
    return json.loads(json.dumps(obj))


def build_space(model: nn.Module, recipe="lsq-w4a4", *, example_input=None, precisions=DEFAULT_PRECISIONS,
                fixed=DEFAULT_FIXED, fixed_bits: int | None = 8, metric: str = "bitops",
                costs: CostModel | None = None) -> SearchSpace:
    """The :class:`SearchSpace` of ``model`` (a float model) under the base ``recipe``.

    ``fixed``: name patterns (``@first``, ``@last``, globs) of layers kept out of the selection,
    at ``fixed_bits`` for both sides (None: at the base recipe's bits). ``example_input``: one
    batch, for the MAC count (bit-operations); an MLP gets ``zeros(1, in_features)`` by default.
    Raises :class:`RecipeError` for a model with no quantizable layer, no candidate left, an
    unknown metric, or a candidate precision the recipe's quantizers cannot do.
    """
    check_metric(metric)
    if any(isinstance(m, QuantMixin) for m in model.modules()):
        raise RecipeError("build the mixed-precision search space from the float model, not a quantized one")
    base = load_recipe(recipe)
    ps = sort_precisions(precisions)
    if fixed_bits is not None:
        fixed_bits = parse_precision(fixed_bits)[0]
    plan, _ = resolve_plan(model, base)  # raises for a model with no quantizable layer
    names = list(plan)
    modules = dict(model.named_modules())
    fixed_names = set()
    for pattern in fixed or ():
        hits = match_layers(pattern, {n: modules[n] for n in names})
        if not hits:
            raise RecipeError(f"fixed-layer pattern {pattern!r} matches no quantized layer; layers: {names[:12]}")
        fixed_names.update(hits)
    candidates, fixed_prec, specs = [], {}, {}
    for n in names:
        w_spec, a_spec = plan[n]
        if n in fixed_names and fixed_bits is not None:
            w_spec = {**w_spec, "bits": fixed_bits} if w_spec else None
            a_spec = {**a_spec, "bits": fixed_bits} if a_spec else None
        specs[n] = (w_spec, a_spec)
        if n in fixed_names or w_spec is None or a_spec is None:
            fixed_prec[n] = (w_spec["bits"] if w_spec else FLOAT_BITS, a_spec["bits"] if a_spec else FLOAT_BITS)
        else:
            candidates.append(n)
    if not candidates:
        raise RecipeError(f"no candidate layers: all {len(names)} quantized layer(s) {names[:6]} are fixed "
                          f"({list(fixed)}) or keep a float side; nothing to select")
    _check_precisions(ps, candidates, specs, modules)
    if costs is None:
        costs = CostModel.from_model(model, example_input, metric=metric)
    return SearchSpace(base, costs, candidates, fixed_prec, ps, metric, specs, fixed_bits)


def _check_precisions(ps: list[Precision], candidates: list[str], specs: dict, modules: dict) -> None:
    """Build each distinct candidate quantizer at each precision; a failure is a RecipeError."""
    seen = set()
    for n in candidates:
        w_spec, a_spec = specs[n]
        key = json.dumps([w_spec, a_spec], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        layer = modules[n]
        for p in ps:
            try:
                wq = build_quantizer({**w_spec, "bits": p[0]}, "weight", n, layer)
                wq.init_from(layer.weight.detach())
                a = dict(a_spec, bits=p[1])
                for signed in ([True, False] if a.get("signed", "auto") in ("auto", None) else [a["signed"]]):
                    if signed and a.get("signed", "auto") in ("auto", None) and p[1] < 2:
                        continue  # auto-signed activations after ReLU are unsigned; 1-bit signed is checked if asked
                    build_quantizer({**a, "signed": signed}, "activation", n, layer)
            except (RecipeError, ValueError) as exc:
                raise RecipeError(f"candidate precision {precision_label(p)} is not possible with the base "
                                  f"recipe's quantizers ({w_spec.get('method')} weights, {a_spec.get('method')} "
                                  f"activations): {exc}") from None


def copy_space(space: SearchSpace, **changes) -> SearchSpace:
    out = copy.copy(space)
    for k, v in changes.items():
        setattr(out, k, v)
    return out
