"""Model surgery: recipe + float model -> quantized model.

:func:`quantize` finds every Conv1d/Conv2d/Linear of any ``nn.Module``, resolves its recipe
spec (defaults, ``layers`` overrides by glob, ``@first``/``@last``/``@depthwise``, ``skip``), swaps in the
quantized layer (sharing the float parameters), and calibrates the activation quantizers on
``calib_data`` if given. Layers it cannot quantize stay float and are listed in
``qmodel.lowbit_report``. A failed call leaves the caller's model exactly as it was.

torch's ``nn.TransformerEncoderLayer`` has an inference fast path (eval mode, no grad) that
calls one fused kernel with ``linear1``/``linear2``'s weights and never runs their forward, so
it would silently skip the quantizers (and calibration). torch's own rule takes the slow path
when ``activation_relu_or_gelu`` is false (it is what torch sets for an activation the kernel
does not support), and the slow path applies ``self.activation`` as before; so :func:`quantize`
sets it to 0 in every encoder layer holding a quantized layer, and turns off
``nn.TransformerEncoder``'s nested-tensor conversion (``use_nested_tensor``), which no quantizer
can read. Nothing else changes: the state dict and the float outputs stay the same.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import itertools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.errors import CalibrationError, RecipeError
from lowbit.nn.modules import QUANT_MODULES, QuantMixin, quant_embedding_class
from lowbit.quant import make_quantizer
from lowbit.nn.fold import fold_batchnorm
from lowbit.quant.base import Quantizer
from lowbit.quant.grid import Granularity
from lowbit.recipe import DEPTHWISE, FIRST, LAST, POINTS, Recipe, load_recipe


@dataclass
class QuantReport:
    """What :func:`quantize` did: the spec of each quantized layer, and the layers left float (with why)."""

    recipe: Recipe
    quantized: dict[str, dict] = field(default_factory=dict)
    left_float: dict[str, str] = field(default_factory=dict)
    calibration_batches: int = 0
    folded: list[tuple[str, str]] = field(default_factory=list)
    points: dict[str, list[str]] = field(default_factory=dict)  # recipe section -> modules a pipeline quantized


def quantizable_layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Conv/Linear layers lowbit can swap, in ``named_modules()`` order, and those it cannot (with why)."""
    ok, refused = {}, {}
    functional = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            functional.add(f"{name}.out_proj" if name else "out_proj")
            refused[name] = "nn.MultiheadAttention uses in_proj_weight functionally; write attention with Linear layers to quantize it"
    for name, m in model.named_modules():
        if isinstance(m, QuantMixin):
            raise RecipeError(f"layer {name!r} is already quantized; quantize the float model instead")
        base = next((b for b in QUANT_MODULES if isinstance(m, b)), None)
        if base is None:
            continue
        if name in functional:
            refused[name] = "out_proj of nn.MultiheadAttention is applied functionally, not through its forward"
        elif type(m) not in QUANT_MODULES:
            refused[name] = f"{type(m).__name__} is a subclass of {base.__name__} whose forward lowbit cannot wrap"
        else:
            ok[name] = m
    return ok, refused


def embedding_tables(model: nn.Module) -> dict[str, nn.Embedding]:
    """The float ``nn.Embedding`` tables (and subclasses) the ``embeddings`` point quantizes, by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) and not isinstance(m, QuantMixin)}


def is_depthwise(layer: nn.Module) -> bool:
    """A convolution with one input channel per group (``groups == in_channels > 1``)."""
    return isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1 and layer.groups == layer.in_channels


def match_layers(pattern: str, layers: dict[str, nn.Module]) -> list[str]:
    """The names in ``layers`` (in order) a recipe pattern selects: ``@first``/``@last`` the first/last of
    them, ``@depthwise`` every depthwise convolution (none in a model without one), else a shell-style glob."""
    names = list(layers)
    if pattern == FIRST:
        return names[:1]
    if pattern == LAST:
        return names[-1:]
    if pattern == DEPTHWISE:
        return [n for n in names if is_depthwise(layers[n])]
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def resolve_plan(model: nn.Module, recipe: Recipe) -> tuple[dict[str, tuple[dict | None, dict | None]], dict[str, str]]:
    """``{layer name: (weight spec, activation spec)}`` for every layer to quantize, plus layers left float."""
    layers, left_float = quantizable_layers(model)
    names = list(layers)
    if not names:
        raise RecipeError(f"{type(model).__name__} has no Conv1d/Conv2d/Linear layer lowbit can quantize"
                          + (f" (left float: {left_float})" if left_float else ""))
    matches = functools.partial(match_layers, layers=layers)
    tables = list(embedding_tables(model)) if recipe.embeddings is not None else []
    for pattern in list(recipe.layers) + recipe.skip:
        names_table = pattern not in recipe.skip and any(fnmatch.fnmatchcase(t, pattern) for t in tables)
        if not matches(pattern) and not names_table and pattern != DEPTHWISE:
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise RecipeError(f"recipe pattern {pattern!r} matches no quantizable layer; layers are: {shown}"
                              + (f"; embedding tables: {', '.join(tables)}" if tables else "")
                              + (f"; selectors are {FIRST}, {LAST}, {DEPTHWISE}" if pattern.startswith("@") else ""))
    skipped = {n for p in recipe.skip for n in matches(p)}
    plan = {}
    for name in names:
        if name in skipped:
            left_float[name] = "skipped by the recipe"
            continue
        patterns = [p for p in recipe.layers if name in matches(p)]
        w_spec, a_spec = recipe.spec_for(name, "weights", patterns), recipe.spec_for(name, "activations", patterns)
        if w_spec is None and a_spec is None:
            left_float[name] = "both weights and activations set to float by the recipe"
            continue
        plan[name] = (w_spec, a_spec)
    return plan, left_float


def build_quantizer(spec: dict | None, role: str, name: str, layer: nn.Module | None = None) -> Quantizer | None:
    """The quantizer a spec asks for; per-channel activations of a Linear layer use its last axis."""
    if spec is None:
        return None
    opts = {k: v for k, v in spec.items() if k not in ("method", "bits", "granularity", "signed")}
    signed = spec.get("signed", "auto")
    granularity = spec.get("granularity")
    if role == "activation" and granularity == "channel" and isinstance(layer, nn.Linear):
        granularity = Granularity("channel", axis=-1)
    if granularity == "token" and layer is not None and not isinstance(layer, nn.Linear):
        raise RecipeError(f"layer {name!r} inputs: granularity 'token' steps each vector of a Linear input's last "
                          f"axis, and this is a {type(layer).__name__}; give it 'tensor' or 'channel' "
                          f"(layers: {{{name!r}: {{activations: {{granularity: tensor}}}}}})")
    try:
        q = make_quantizer(spec["method"], bits=spec["bits"], role=role,
                           signed=None if signed in ("auto", None) else bool(signed),
                           granularity=granularity, **opts)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"layer {name!r} {role}s: {exc}") from None
    size = q.granularity.group_size if q.granularity.kind == "group" else None
    weight = getattr(layer, "weight", None)
    if size is not None and weight is not None and weight[0].numel() % size:
        raise RecipeError(f"layer {name!r} weights: group:{size} needs a multiple of {size} weights per output "
                          f"channel, and it has {weight[0].numel()}; give that layer another group size or "
                          f"granularity: channel (layers: {{{name!r}: {{weights: {{granularity: channel}}}}}})")
    q.name = f"{name}.{'weight' if role == 'weight' else 'input'}"
    return q


def quantize(model: nn.Module, recipe=None, calib_data: Iterable | None = None, *, inplace: bool = False,
             calib_batches: int | None = None) -> nn.Module:
    """Return a quantized copy of ``model`` (or ``model`` itself with ``inplace=True``).

    ``recipe``: a :class:`~lowbit.recipe.Recipe`, dict, YAML path or shipped recipe name
    (default: min-max W8A8, per-channel weights). ``calib_data``: any iterable of input
    tensors, ``(input, target)`` pairs or keyword dicts; at most ``calib_batches`` are used.
    Without calibration data, activation quantizers initialise from the first batch they see.
    The recipe's ``embeddings`` section quantizes every ``nn.Embedding`` table; ``kv_cache`` (and any
    other section a pipeline registered with :func:`register_points`) is handed to that pipeline.
    """
    recipe = load_recipe(recipe if recipe is not None else Recipe())
    ptq = ptq_options(recipe)
    plan, left_float = resolve_plan(model, recipe)
    for point in POINTS:
        if getattr(recipe, point) is not None and point != "embeddings" and point not in _POINT_PROVIDERS:
            raise RecipeError(f"the recipe's {point!r} section needs the pipeline that handles it; "
                              "import lowbit (not only lowbit.prepare) first")
    target = model if inplace else copy.deepcopy(model)
    undo: list[Callable[[], None]] = []  # run in reverse if anything fails: the caller's model is left as it was
    report = QuantReport(recipe, left_float=left_float)
    try:
        if ptq["fold_bn"]:
            if calib_data is None:
                raise RecipeError("the recipe folds batch norm (ptq: {fold_bn: true}), which needs calib_data: "
                                  "one example batch finds the conv -> batch-norm pairs")
            first, calib_data = _peek(calib_data)
            if isinstance(_inputs(first), dict):
                check_token_ids(target, _inputs(first))
            folded = fold_batchnorm(target, _inputs(first))
            undo.append(folded.undo)
            report.folded = list(folded)
        modules = dict(target.named_modules())
        for name, (w_spec, a_spec) in plan.items():
            layer = modules[name]
            wq = build_quantizer(w_spec, "weight", name, layer)
            aq = build_quantizer(a_spec, "activation", name, layer)
            if wq is not None and not torch.isfinite(layer.weight).all():
                raise RecipeError(f"layer {name!r}: its weight holds NaN or Inf; fix the model before quantizing")
            _swap(target, name, QUANT_MODULES[type(layer)].from_float(layer, wq, aq), undo)
            report.quantized[name] = {"weights": w_spec, "activations": a_spec}
        if recipe.embeddings is not None:
            _quantize_embeddings(target, recipe, report, undo)
        for point, replacements in _POINT_PROVIDERS.items():
            if getattr(recipe, point) is not None:
                swaps = replacements(target, getattr(recipe, point))
                for name, module in swaps.items():
                    _swap(target, name, module, undo)
                report.points[point] = list(swaps)
        for point, change in _MODEL_CHANGES.items():
            if getattr(recipe, point) is not None and (revert := change(target, getattr(recipe, point))):
                undo.append(revert)
        for module, attr, value in _disable_fused_fast_paths(target):
            undo.append(functools.partial(setattr, module, attr, value))
        if calib_data is not None:
            report.calibration_batches = calibrate(target, calib_data, max_batches=calib_batches)
    except Exception:
        for revert in reversed(undo):
            revert()
        raise
    target.lowbit_report = report
    return target


def release_frozen_weights(qmodel: nn.Module) -> list[str]:
    """Let fine-tuning train layers whose weight codes bias correction froze; returns their names.

    Bias correction (:mod:`lowbit.quant.bias_correction`) is a post-training transform: it freezes
    a layer's integer weight codes, so its forward has no gradient path to the weight. Here each
    such weight quantizer forgets its codes, stops correcting, and re-derives its grid from the
    current weight by its own method (min-max, ACIQ, ...), as it will at every training step. The
    model's recipe gets a ``bias_correction: false`` override per released layer, so that
    :func:`lowbit.save` / :func:`lowbit.load` rebuild the released model, not the frozen one.
    """
    released = []
    for name, m in qmodel.named_modules():
        wq = m.weight_quantizer if isinstance(m, QuantMixin) else None
        if wq is None or not wq.frozen:
            continue
        wq.unfreeze()
        wq.bias_correction = None
        wq.init_from(m.weight.detach())
        released.append(name)
    report = getattr(qmodel, "lowbit_report", None)
    if released and report is not None:
        old = report.recipe
        layers = {**old.layers, **{name: {"weights": {"bias_correction": False}} for name in released}}
        report.recipe = dataclasses.replace(old, layers=layers)
    return released


def _swap(root: nn.Module, name: str, module: nn.Module, undo: list) -> None:
    """Put ``module`` at ``name`` and record how to put the old one back."""
    undo.append(functools.partial(_set_submodule, root, name, root.get_submodule(name)))
    _set_submodule(root, name, module)


def _quantize_embeddings(model: nn.Module, recipe: Recipe, report: QuantReport, undo: list) -> None:
    """Swap every ``nn.Embedding`` (or subclass: :func:`~lowbit.nn.modules.quant_embedding_class`) for a
    quantized table (weights only; per-row steps with ``granularity: channel``), with the recipe's ``embeddings``
    spec merged with the ``weights`` of any ``layers`` pattern naming the table (``weights: null`` leaves it
    float). A model without one has nothing to quantize there (the shipped recipes carry an ``embeddings``
    section for the language models they meet). Raises :class:`RecipeError` for a subclass whose forward does
    not read the quantized table."""
    for name, table in embedding_tables(model).items():
        spec = recipe.spec_for(name, "weights", [p for p in recipe.layers if fnmatch.fnmatchcase(name, p)],
                               point="embeddings")
        if spec is None:
            report.left_float[name] = "embedding table set to float by the recipe"
            continue
        wq = build_quantizer(spec, "weight", name, table)
        quantized = quant_embedding_class(type(table)).from_float(table, wq, None)
        if type(table) is not nn.Embedding and not _reads_quantized_table(quantized):
            raise RecipeError(f"{name} is a {type(table).__module__}.{type(table).__name__}, whose forward does not "
                              "look its ids up through nn.Embedding.forward, so lowbit cannot quantize its table; "
                              "drop the recipe's embeddings section to leave the tables float")
        _swap(model, name, quantized, undo)
        report.quantized[name] = {"weights": spec, "activations": None}


def _reads_quantized_table(table: nn.Module) -> bool:
    """Whether a quantized table's forward calls its weight quantizer (one id looked up, no gradient)."""
    calls = []
    handle = table.weight_quantizer.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            table(torch.zeros(1, dtype=torch.long, device=table.weight.device))
    finally:
        handle.remove()
    return bool(calls)


# ----- quantization points contributed by pipelines ----------------------------------------------
Replacements = Callable[[nn.Module, dict], dict[str, nn.Module]]
_POINT_PROVIDERS: dict[str, Replacements] = {}


def register_points(section: str, replacements: Replacements) -> None:
    """Let a pipeline quantize what a recipe section asks for (:mod:`lowbit.llm` registers ``kv_cache``).

    ``replacements(model, spec)`` is called after the layers were swapped and before calibration;
    it returns ``{module name: quantized module}`` without changing ``model``, and ``quantize``
    swaps them in (and back, if a later step fails). It raises
    :class:`~lowbit.errors.RecipeError` for a model it cannot quantize. Quantizers of data (not
    weights) have ``role = "activation"``, so calibration sets them with the layers' inputs.
    """
    _check_pipeline_section(section, "register_points")
    _POINT_PROVIDERS[section] = replacements


ModelChange = Callable[[nn.Module, dict], Callable[[], None] | None]
_MODEL_CHANGES: dict[str, ModelChange] = {}


def register_model_change(section: str, change: ModelChange) -> None:
    """Let a pipeline change the model itself for a recipe section (:mod:`lowbit.llm` registers the
    ``kv_cache`` section's sink prefix): ``change(model, spec)`` runs in place after the quantization
    points were swapped in and before calibration, and returns how to undo it (or None when it
    changed nothing), so that a later failure leaves the caller's model as it was."""
    _check_pipeline_section(section, "register_model_change")
    _MODEL_CHANGES[section] = change


def _check_pipeline_section(section: str, caller: str) -> None:
    if section not in POINTS or section == "embeddings":
        raise ValueError(f"{caller}: {section!r} is not a pipeline's recipe section; those are "
                         f"{[p for p in POINTS if p != 'embeddings']}")


def _disable_fused_fast_paths(model: nn.Module) -> list[tuple[nn.Module, str, object]]:
    """Make torch's transformer layers run their quantized Linear forwards (module docstring).

    Returns ``(module, attribute, old value)`` for each change, so a failed call can undo it.
    """
    changed = []
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer):
            attr = "activation_relu_or_gelu"
        elif isinstance(m, nn.TransformerEncoder):
            attr = "use_nested_tensor"
        else:
            continue
        if getattr(m, attr, False) and any(isinstance(sub, QuantMixin) for sub in m.modules()):
            changed.append((m, attr, getattr(m, attr)))
            setattr(m, attr, 0 if attr == "activation_relu_or_gelu" else False)
    return changed


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


PTQ_OPTIONS = {"fold_bn": False}


def ptq_options(recipe: Recipe) -> dict:
    """The recipe's ``ptq:`` section with defaults; unknown keys are an error."""
    section = recipe.sections.get("ptq") or {}
    if not isinstance(section, dict) or set(section) - set(PTQ_OPTIONS):
        raise RecipeError(f"the recipe's 'ptq' section takes {sorted(PTQ_OPTIONS)}, got {section!r}")
    return {**PTQ_OPTIONS, **section}


def _peek(data: Iterable):
    """The first batch of ``data`` and an iterable that still yields every batch (generators too)."""
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise CalibrationError("the calibration data yielded no batches; pass a non-empty loader") from None
    return first, (itertools.chain([first], iterator) if iterator is data else data)


def _inputs(batch):
    """The model input of a calibration batch: a tensor, the first item of a pair, or a keyword dict."""
    if isinstance(batch, (torch.Tensor, dict)):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise CalibrationError(f"calibration batches must be tensors, (input, target) pairs or dicts, "
                           f"got {type(batch).__name__}")


def forward_batch(model: nn.Module, batch) -> None:
    """Run ``model`` on a calibration batch of any accepted form (tensor, ``(input, target)``, tokenizer dict)."""
    inputs = _inputs(batch)
    if isinstance(inputs, dict):
        check_token_ids(model, inputs)
        model(**inputs)
    else:
        model(inputs)


def check_token_ids(model: nn.Module, batch: dict) -> None:
    """Raise :class:`CalibrationError` when a tokenizer batch's ``input_ids`` fall outside the model's vocabulary
    (a tokenizer of another model), instead of an index error deep inside the embedding."""
    ids = batch.get("input_ids")
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(ids, torch.Tensor) or not isinstance(table, nn.Embedding) or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= table.num_embeddings:
        raise CalibrationError(f"token ids span [{low}, {high}] but {type(model).__name__} has a vocabulary of "
                               f"{table.num_embeddings}: the batches come from another model's tokenizer; tokenize "
                               "with the tokenizer saved with this model")


def input_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """The input quantizer of each quantized layer, by layer name."""
    return {name: m.input_quantizer for name, m in model.named_modules()
            if isinstance(m, QuantMixin) and m.input_quantizer is not None}


def activation_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every quantizer of data rather than weights (layer inputs, and points such as the KV cache), by
    module name: what calibration sets."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantizer) and m.role != "weight"}


@torch.no_grad()
def calibrate(model: nn.Module, data: Iterable, *, max_batches: int | None = None) -> int:
    """Run ``data`` through ``model`` in eval mode, then set every activation quantizer's grid.

    Returns the number of batches used. Raises :class:`CalibrationError` for an empty
    loader or non-finite activations (naming the layer).
    """
    quantizers = activation_quantizers(model)
    if not quantizers:
        return 0
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for q in quantizers.values():
            q.reset_stats()
            q.calibrating = True
        for batch in data:
            if max_batches is not None and seen >= max_batches:
                break
            forward_batch(model, batch)
            seen += 1
    finally:
        for q in quantizers.values():
            q.calibrating = False
        model.train(was_training)
    if seen == 0:
        raise CalibrationError("the calibration data yielded no batches; pass a non-empty loader "
                               "(e.g. a few hundred training images)")
    unused = []
    for name, q in quantizers.items():
        try:
            q.finalize()
        except CalibrationError:
            if q.signed is None:  # never reached by the data: initialise on first use instead
                unused.append(name)
                continue
            raise
    if unused:
        warnings.warn(f"calibration never reached quantizer(s) {unused}; their grids will be set "
                      "from the first batch they see", stacklevel=2)
    return seen
