"""Mixed precision: which layers run at 2 bits and which keep 4 (EAGL and ALPS, Bablani et al.,
arXiv:2301.13330), under a bit-operations or size budget.

    import lowbit
    sel = lowbit.select_precision(model, budget=0.5, method="eagl", recipe="lsq-w4a4")
    # a model outside the zoo: also example_input=torch.zeros(1, 1, 28, 28) (one batch)
    sel.save("eagl-half.yaml")                   # a recipe: lowbit.quantize / lowbit ptq / lowbit qat
    qmodel = lowbit.quantize(model, sel.recipe(), calib_data=calib)

Modules: :mod:`~lowbit.mixed.cost` (MACs, stored bits, bit-operations), :mod:`~lowbit.mixed.space`
(candidates, fixed first/last layers, assignments <-> recipes), :mod:`~lowbit.mixed.eagl` (entropy
gains), :mod:`~lowbit.mixed.alps` (fine-tuning gains, cached, sharded), :mod:`~lowbit.mixed.knapsack`
(the exact budget solver, random baseline, additivity check), :mod:`~lowbit.mixed.frontier`
(selection by method, the accuracy-cost sweep).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lowbit.errors import RecipeError
from lowbit.mixed.alps import ALPS, ALPSResult, run_alps
from lowbit.mixed.cost import (
    CostModel,
    LayerCost,
    count_macs,
    parse_precision,
    precision_label,
)
from lowbit.mixed.eagl import eagl_entropies, eagl_gains, entropy_bits
from lowbit.mixed.frontier import (
    METHODS,
    Selection,
    compute_gains,
    run_frontier,
    select,
)
from lowbit.mixed.knapsack import (
    additivity_check,
    random_assignment,
    select_assignment,
    solve_knapsack,
)
from lowbit.mixed.space import (
    DEFAULT_FIXED,
    DEFAULT_PRECISIONS,
    SearchSpace,
    build_space,
)


def select_precision(model: nn.Module, budget: float = 0.5, method: str = "eagl", *, recipe="lsq-w4a4",
                     example_input=None, precisions=DEFAULT_PRECISIONS, metric: str = "bitops",
                     fixed=DEFAULT_FIXED, fixed_bits: int | None = 8, absolute: bool = False,
                     weighting="none", qmodel: nn.Module | None = None, seed: int = 0,
                     train_data=None, eval_data: Iterable | None = None, calib_data: Iterable | None = None,
                     steps: int = 100, cache_dir=None, shard=None, log=print) -> Selection:
    """Choose each layer's precision within ``budget``; returns a :class:`Selection`.

    ``model``: the float model. ``budget``: a fraction of the cost with every candidate at the
    highest precision (the uniform ``recipe`` model; first/last layers at ``fixed_bits``), or
    cost units with ``absolute=True``; ``metric``: ``"bitops"`` (MACs x w_bits x a_bits, counted on
    ``example_input``, one batch of inputs; zoo models record their input shape and models starting
    with a Linear need none) or ``"size"`` (stored weight bits).
    ``method``: ``"eagl"`` (no data; ``weighting`` as in :mod:`lowbit.mixed.eagl`; ``qmodel``: a
    quantized model whose learned high-precision steps to use), ``"alps"`` (needs ``train_data``
    and ``eval_data``, held-out images; ``steps`` per fine-tune; cached in ``cache_dir``;
    ``shard="i/n"`` runs a part), ``"random"`` or ``"uniform"``. ``precisions``: candidate
    precisions (default W4A4 / W2A2). Raises :class:`~lowbit.errors.RecipeError` for a budget
    outside the feasible range (the message gives it), a precision the recipe's quantizers cannot
    do, or a model with no quantizable layer.
    """
    if method not in METHODS:
        raise RecipeError(f"method must be one of {list(METHODS)}, got {method!r}")
    space = build_space(model, recipe, example_input=example_input, precisions=precisions, fixed=fixed,
                        fixed_bits=fixed_bits, metric=metric)
    space.absolute_budget(budget, absolute=absolute)  # fail fast, before any ALPS training
    gains, info = None, {}
    if method == "alps":
        if train_data is None or eval_data is None:
            raise RecipeError("method 'alps' fine-tunes: pass train_data and eval_data (held-out images)")
        alps = ALPS(model, space, train_data, eval_data, steps=steps, calib_data=calib_data, cache_dir=cache_dir,
                    seed=seed, log=log)
        gains, info = compute_gains("alps", model, space, alps=alps, shard=shard)  # raises if runs are missing
    return select(space, budget, method, gains=gains, info=info, absolute=absolute, seed=seed, model=model,
                  weighting=weighting, qmodel=qmodel)


__all__ = [
    "ALPS",
    "DEFAULT_FIXED",
    "DEFAULT_PRECISIONS",
    "METHODS",
    "ALPSResult",
    "CostModel",
    "LayerCost",
    "SearchSpace",
    "Selection",
    "additivity_check",
    "build_space",
    "count_macs",
    "eagl_entropies",
    "eagl_gains",
    "entropy_bits",
    "parse_precision",
    "precision_label",
    "random_assignment",
    "run_alps",
    "run_frontier",
    "select",
    "select_assignment",
    "select_precision",
    "solve_knapsack",
]
