"""Recipes: plain data that says which layers get which quantizer.

A recipe is a YAML file, a dict of the same shape, or a :class:`Recipe`::

    weights: {method: sawb, bits: 4, granularity: channel}
    activations: {method: pact, bits: 4}
    layers:                       # overrides, by shell-style glob on named_modules() names
      "conv1": {weights: {bits: 8}, activations: {bits: 8}}
      "@last": {weights: {bits: 8}, activations: {bits: 8}}   # @first / @last: first / last quantizable layer
      "@depthwise": {weights: {granularity: channel}}           # every depthwise convolution (may be none)
    skip: ["head.*"]              # these stay float
    embeddings: {method: lsq, bits: 8, granularity: channel}   # every nn.Embedding's table (default: float)
    kv_cache: {method: lsq, bits: 8, granularity: head}        # language models: keys and values as cached

A quantizer spec takes ``method``, ``bits``, ``granularity`` (``tensor``, ``channel``,
``group:SIZE`` for weights, ``token`` for min-max activations: each token's step computed at run time), ``signed`` (``auto``/true/false) and the method's own options (e.g.
``percentile``, ``prior``, ``convention``). ``weights: null`` or ``activations: null`` keeps that
side float. ``embeddings`` quantizes the table of every ``nn.Embedding`` (one step per table, or
per row with ``granularity: channel``: one step per token); a ``layers`` pattern that names a table
overrides its ``weights`` there (``{weights: {bits: 8}}``, or ``{weights: null}`` to keep it float).
``kv_cache`` quantizes the keys (after the rotary embedding) and values of every attention block as
they are written to the cache (one step per KV head with ``granularity: head``, or per tensor); it
needs a model whose attention family :mod:`lowbit.llm` knows; its ``sink_prefix`` (token ids, or
``bos``) puts those tokens' float keys and values in front of every sequence
(:mod:`lowbit.llm.sink_prefix`). Both are absent
(float) unless given. Overrides merge over the defaults; an override that changes ``method`` drops
the default's method-specific options. Later patterns win over earlier ones. Other top-level
sections (``calibration``, ``ptq``, ``qat``, ``mixed``, ``name``, ``description``) are kept for
the pipelines that read them.

A recipe is plain data: mappings with string keys, lists, strings, integers, finite numbers,
booleans and null. Anything else YAML can express (dates, sets, binary, NaN) raises a
:class:`~lowbit.errors.RecipeError` naming the field, as does every other invalid value, so a
recipe file from anywhere fails with lowbit's own error, and every recipe can be written into
a checkpoint or an export manifest as JSON.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lowbit.errors import RecipeError
from lowbit.files import write_text_atomic
from lowbit.quant import QUANTIZERS, make_granularity, quantizer_options
from lowbit.quant.grid import check_bits

RECIPE_DIR = Path(__file__).parent / "recipes"
SIDES = ("weights", "activations")
COMMON_KEYS = {"method", "bits", "granularity", "signed"}
PIPELINE_SECTIONS = {"name", "description", "calibration", "ptq", "qat", "mixed", "export"}
TEXT_SECTIONS = {"name", "description"}  # the others are mappings of settings
POINTS = ("embeddings", "kv_cache")  # quantization points beyond the Conv/Linear layers
POINT_GRANULARITIES = {"embeddings": ("tensor", "channel"), "kv_cache": ("head", "tensor")}
MAX_SINK_PREFIX = 64  # tokens
TOP_KEYS = set(SIDES) | {"layers", "skip"} | set(POINTS) | PIPELINE_SECTIONS
FIRST, LAST, DEPTHWISE = "@first", "@last", "@depthwise"


@dataclass
class Recipe:
    weights: dict | None = field(default_factory=lambda: {"method": "minmax", "bits": 8, "granularity": "channel"})
    activations: dict | None = field(default_factory=lambda: {"method": "minmax", "bits": 8})
    layers: dict[str, dict] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    sections: dict = field(default_factory=dict)
    embeddings: dict | None = None
    kv_cache: dict | None = None

    def __post_init__(self):
        for side in SIDES:
            if getattr(self, side) is not None:
                setattr(self, side, validate_spec(getattr(self, side), f"{side}", full=True))
        for point in POINTS:
            if getattr(self, point) is not None:
                setattr(self, point, validate_point_spec(getattr(self, point), point))
        if not isinstance(self.layers, dict):
            raise RecipeError(f"'layers' must map name patterns to overrides, got {type(self.layers).__name__}")
        for pattern, override in self.layers.items():
            if not isinstance(pattern, str):
                raise RecipeError(f"layers: the pattern {pattern!r} is not a string (quote it)")
            if not isinstance(override, dict) or set(override) - set(SIDES):
                raise RecipeError(f"layers[{pattern!r}] must be a mapping with keys among {SIDES}, got {override!r}")
            for side, spec in override.items():
                if spec is not None:
                    validate_spec(spec, f"layers[{pattern!r}].{side}", full=False)
        if not isinstance(self.skip, (list, tuple)) or not all(isinstance(p, str) for p in self.skip):
            raise RecipeError(f"'skip' must be a list of name patterns, got {self.skip!r}")
        self.skip = list(self.skip)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe is a mapping, got {type(data).__name__}")
        check_plain_data(data, "recipe")
        unknown = set(data) - TOP_KEYS
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
        for key in PIPELINE_SECTIONS & set(data):
            kind = str if key in TEXT_SECTIONS else dict
            if data[key] is not None and not isinstance(data[key], kind):
                raise RecipeError(f"{key}: a {'text' if kind is str else 'mapping of settings'}, got {data[key]!r}")
        defaults = cls()
        data = copy.deepcopy(data)
        return cls(weights=data.get("weights", defaults.weights),
                   activations=data.get("activations", defaults.activations),
                   layers=data.get("layers") or {}, skip=data.get("skip") or [],
                   sections={k: data[k] for k in PIPELINE_SECTIONS if k in data},
                   **{k: data.get(k) for k in POINTS})

    def to_dict(self) -> dict:
        out = {"weights": copy.deepcopy(self.weights), "activations": copy.deepcopy(self.activations)}
        if self.layers:
            out["layers"] = copy.deepcopy(self.layers)
        if self.skip:
            out["skip"] = list(self.skip)
        for point in POINTS:
            if getattr(self, point) is not None:
                out[point] = copy.deepcopy(getattr(self, point))
        out.update(copy.deepcopy(self.sections))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the recipe as YAML (atomically: a temporary file moved into place)."""
        write_text_atomic(path, self.to_yaml())

    def spec_for(self, name: str, side: str, matched_patterns: list[str], *, point: str | None = None) -> dict | None:
        """The merged spec of one layer's ``side`` given the override patterns that match it; ``point``
        (``embeddings``): start from that point's spec instead (an embedding table's weights)."""
        spec = copy.deepcopy(getattr(self, point or side))
        for pattern in matched_patterns:
            override = self.layers[pattern]
            if side not in override:
                continue
            if override[side] is None:
                spec = None
                continue
            if spec is None:
                spec = {}
            if "method" in override[side] and override[side]["method"] != spec.get("method"):
                spec = {k: v for k, v in spec.items() if k in COMMON_KEYS}
            spec.update(override[side])
        if spec is not None:
            spec = validate_spec(spec, f"layer {name!r} {side}", full=True)
        return spec


def validate_spec(spec, where: str, *, full: bool) -> dict:
    """Check one quantizer spec; ``full`` specs must name a method and bits."""
    if not isinstance(spec, dict):
        raise RecipeError(f"{where}: a quantizer spec is a mapping like {{method: lsq, bits: 4}}, got {spec!r}")
    spec = dict(spec)
    if full and ("method" not in spec or "bits" not in spec):
        raise RecipeError(f"{where}: needs both 'method' and 'bits', got {spec}")
    method = spec.get("method")
    if method is not None and (not isinstance(method, str) or method not in QUANTIZERS):
        raise RecipeError(f"{where}: unknown method {method!r}; choose one of {sorted(QUANTIZERS)}")
    if "bits" in spec:
        try:
            check_bits(spec["bits"])
        except ValueError as exc:
            raise RecipeError(f"{where}: {exc}") from None
    if spec.get("signed", "auto") not in ("auto", True, False, None):
        raise RecipeError(f"{where}: signed must be auto, true or false, got {spec['signed']!r}")
    if "granularity" in spec:
        try:
            make_granularity(spec["granularity"], "weight" if where.endswith("weights") else "activation")
        except ValueError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        if spec["granularity"] == "token" and method in QUANTIZERS and not QUANTIZERS[method].supports_token:
            raise RecipeError(f"{where}: {method} cannot compute a step per token at run time; granularity 'token' "
                              "needs method minmax")
    if method is not None and full:
        unknown = set(spec) - COMMON_KEYS - quantizer_options(method)
        if unknown:
            allowed = sorted(quantizer_options(method) - {"bits", "signed", "granularity", "role"})
            raise RecipeError(f"{where}: {method} does not take option(s) {sorted(unknown)}; it takes {allowed}")
    return spec


def validate_point_spec(spec, point: str) -> dict:
    """Check an ``embeddings`` or ``kv_cache`` spec: a full quantizer spec whose granularity is one
    that point has (``head``, the cache's default, means one step per KV head; embeddings default to
    one step per table)."""
    if not isinstance(spec, dict):
        raise RecipeError(f"{point}: a quantizer spec is a mapping like {{method: lsq, bits: 8}} (or null for "
                          f"float), got {spec!r}")
    allowed = POINT_GRANULARITIES[point]
    granularity = spec.get("granularity", allowed[0])
    if granularity not in allowed:
        raise RecipeError(f"{point}: granularity must be one of {list(allowed)}, got {granularity!r}")
    role = "weights" if point == "embeddings" else "activations"
    own = {"granularity"} | ({"sink_prefix"} if point == "kv_cache" else set())
    checked = validate_spec({k: v for k, v in spec.items() if k not in own}, f"{point} ({role})", full=True)
    if "sink_prefix" in spec and point == "kv_cache":
        checked["sink_prefix"] = check_sink_prefix(spec["sink_prefix"])
    return {**checked, "granularity": granularity} if "granularity" in spec else checked


def check_sink_prefix(tokens) -> list[int] | str:
    """``kv_cache.sink_prefix``: 1 to :data:`MAX_SINK_PREFIX` token ids, or ``bos`` (the model config's BOS)."""
    if tokens == "bos":
        return tokens
    if (not isinstance(tokens, (list, tuple)) or not 1 <= len(tokens) <= MAX_SINK_PREFIX
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)):
        raise RecipeError(f"kv_cache.sink_prefix: bos (the model's BOS token) or a list of 1 to {MAX_SINK_PREFIX} "
                          f"token ids, got {tokens!r}")
    return list(tokens)


def load_recipe(recipe) -> Recipe:
    """A :class:`Recipe` from a Recipe, a dict, a YAML path, or the name of a shipped recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        path = Path(recipe)
        if not path.is_file() and (RECIPE_DIR / f"{recipe}.yaml").is_file():
            path = RECIPE_DIR / f"{recipe}.yaml"
        if not path.is_file():
            raise RecipeError(f"recipe {str(recipe)!r} is neither a file nor a shipped recipe; shipped: "
                              f"{list_recipes()}")
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise RecipeError(f"{path}: cannot be read ({exc})") from None
        return recipe_from_yaml(text, path)
    raise RecipeError(f"a recipe is a Recipe, a dict or a YAML path, got {type(recipe).__name__}")


def recipe_from_yaml(text: bytes | str, where: str | os.PathLike) -> Recipe:
    """A :class:`Recipe` from YAML text (bytes: UTF-8); every error is a RecipeError naming ``where``."""
    try:
        data = yaml.safe_load(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise RecipeError(f"{where}: not valid YAML ({exc})") from None
    try:
        return Recipe.from_dict(data)
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None


def check_plain_data(value, where: str) -> None:
    """Raise a RecipeError naming the field when ``value`` holds anything but JSON-like plain data."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise RecipeError(f"{where}: the key {k!r} is not a string (quote it)")
            check_plain_data(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_plain_data(v, f"{where}[{i}]")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise RecipeError(f"{where}: {value} is not a finite number")
    elif value is not None and not isinstance(value, (str, int, bool)):
        raise RecipeError(f"{where}: a {type(value).__name__} ({value!r}) is not plain data; write a string, "
                          "a number, true/false, null, a list or a mapping")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
