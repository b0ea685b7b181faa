"""An export back as a torch model: the architecture it is handed, with the exported codes and grids.

:func:`load` knows nothing of where architectures come from: the caller hands it the float model
(``lowbit.load_export`` builds zoo models by the name the manifest records, see
:mod:`lowbit.exports`).
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from lowbit.deploy.errors import ExportError, ExportFileError
from lowbit.deploy.fixed import FixedQuantizer
from lowbit.deploy.format import Exported
from lowbit.deploy.graph import Graph, trace_graph
from lowbit.deploy.read import read_export
from lowbit.errors import RecipeError
from lowbit.nn.modules import QUANT_MODULES
from lowbit.prepare import QuantReport
from lowbit.recipe import Recipe, load_recipe


def load(source: str | os.PathLike | Exported, model: nn.Module) -> nn.Module:
    """Rebuild the quantized model of an export (a folder, or an :class:`Exported` already read), in eval mode.

    ``model`` is the float architecture the export was made from; a copy is modified, yours is left
    alone. The copy has the exported batch norms replaced by ``Identity``; each quantized layer holds
    its exported integer codes and grids (:class:`~lowbit.deploy.fixed.FixedQuantizer`), float layers
    their float weights. Its structure is traced and compared with the exported graph first: a
    different architecture raises :class:`~lowbit.deploy.errors.ExportFileError` naming the first
    difference instead of computing something else. Outputs equal the exported model's bit for bit
    when the export holds float biases (``float_bias=True``, the default) and the batch norms were
    folded at quantization; otherwise they differ by float rounding (and the bias rounding, at most
    half an accumulator unit).
    """
    exp = source if isinstance(source, Exported) else read_export(source)
    where = source if not isinstance(source, Exported) else "the export"
    model = copy.deepcopy(model).eval()
    for layer in exp.layers.values():
        if layer.bn:
            try:
                bn = model.get_submodule(layer.bn)
            except AttributeError:
                raise ExportFileError(f"{where}: the model has no module {layer.bn!r} (a batch norm folded into "
                                      f"{layer.name!r}); is it the exported architecture?") from None
            if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Identity)):
                raise ExportFileError(f"{where}: {layer.bn!r} is a {type(bn).__name__}, the export folded a batch "
                                      "norm there")
            model.set_submodule(layer.bn, nn.Identity())
    try:
        graph = trace_graph(model)
    except ExportError as exc:
        raise ExportFileError(f"{where}: the model passed to load cannot be the exported one: {exc}") from exc
    if graph.bn_folds or graph.to_list() != exp.graph.to_list():
        raise ExportFileError(f"{where}: the model's structure differs from the exported graph "
                              f"({_first_difference(graph, exp.graph)}); pass the architecture the model was "
                              "exported from")
    for name in exp.graph.layers:
        _install_layer(model, exp, name, where)
    model.lowbit_export = exp.manifest
    model.lowbit_report = report_of(exp)
    return model.eval()


def _install_layer(model: nn.Module, exp: Exported, name: str, where) -> None:
    layer = exp.layers[name]
    m = model.get_submodule(name)
    if tuple(m.weight.shape) != layer.weight_shape:
        raise ExportFileError(f"{where}: layer {name!r} has weight shape {tuple(m.weight.shape)}, the export "
                              f"{layer.weight_shape}")
    with torch.no_grad():
        m.weight.data = layer.dequantized_weight().to(m.weight.dtype).clone()
        if layer.bias is not None:
            m.bias = nn.Parameter(layer.bias.clone())
        elif m.bias is not None:
            raise ExportFileError(f"{where}: layer {name!r} has a bias the export does not")
    if layer.weight_grid is not None or layer.input_grid is not None:
        wq = FixedQuantizer(layer.weight_grid, "weight", layer.weight_codes, f"{name}.weight") \
            if layer.weight_grid is not None else None
        aq = FixedQuantizer(layer.input_grid, "activation", None, f"{name}.input") \
            if layer.input_grid is not None else None
        model.set_submodule(name, QUANT_MODULES[type(m)].from_float(m, wq, aq))


def report_of(exp: Exported) -> QuantReport:
    try:
        recipe = load_recipe(exp.recipe) if exp.recipe else Recipe()
    except RecipeError:  # a recipe this lowbit cannot parse is informational only
        recipe = Recipe()
    report = QuantReport(recipe, left_float=dict(exp.left_float))
    report.quantized = {n: {} for n, layer in exp.layers.items()
                        if layer.weight_grid is not None or layer.input_grid is not None}
    report.folded = [(n, layer.bn) for n, layer in exp.layers.items() if layer.bn]
    return report


def _first_difference(a: Graph, b: Graph) -> str:
    if a.bn_folds:
        name = next(iter(a.bn_folds.values()))
        return f"the model has a batch norm {name!r} the export does not"
    for x, y in zip(a.to_list(), b.to_list()):
        if x != y:
            return f"model node {x} vs exported node {y}"
    return f"the model has {len(a.nodes)} operations, the export {len(b.nodes)}"
