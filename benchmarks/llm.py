"""Language models: float, round-to-nearest PTQ, lowbit's best PTQ and SiLQ fine-tuning at W8A8KV8,
W4A8KV8 and W4A4KV4, one table per model.

    python benchmarks/llm.py --model bytellama --steps 300                     # every method and width
    python benchmarks/llm.py --model smollm2-135m --steps 100 --batch-size 1 --methods silq --widths w4a8kv8
    python benchmarks/llm.py --model smollm2-135m --sweep --steps 30 --batch-size 1   # choices, on the calib split
    python benchmarks/llm.py --model smollm2-135m --sweep --sweep-settings 2e-5:10,1e-4:10 --steps 30 --batch-size 1
    python benchmarks/llm.py --model smollm2-135m --sweep --sweep-settings 5e-5:10 --variant asymmetric-activations
    python benchmarks/llm.py --model smollm2-135m --speed                      # fine-tune step against the float step
    python benchmarks/llm.py --model smollm2-135m --speed --compile-quantizers # the same, fake-quant compiled
    python benchmarks/llm.py --model smollm2-135m --points                     # which quantization point costs most
    python benchmarks/llm.py --methods ''                                      # rebuild the section from the rows

Protocol. Perplexity, KL(float || quantized) and next-token top-1 agreement with the float model on
fixed windows of the *test* split (:func:`lowbit.data.text.eval_windows`; King Lear and Richard III
for Shakespeare), never seen in training or in any choice. Calibration: ``--calib-windows`` windows
of the calib split in one batch. Fine-tuning: shuffled windows of the train split, the recipe's
``qat:`` settings with ``--steps`` x ``--batch-size`` x ``--length`` tokens. Choices (learning rates)
come from ``--sweep`` rows, scored on fixed windows of the calib split; the SiLQ rows use the sweep's
best setting for the model when one is stored. "best PTQ" is, per model and width, the PTQ method
with the lower calib-split perplexity. SmolLM2's published weights are already 4-bit (Q4_1), Gemma 3
270M's mostly 4- and 5-bit (Q4_K_M): their "float" rows are the dequantized models, and group-wise 4-bit
grids are never reported on them.

Rows are kept in ``docs/results/llm.json`` (with the commit that produced each; the torchao peer's
rows come from ``benchmarks/torchao_peer.py``, run in its own environment), and the 'llm' section
of docs/RESULTS.md is rebuilt from every stored row. Each row is written as soon as it is measured.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import ROOT, load_keyed_rows, store_keyed_row, write_section  # noqa: E402

from lowbit.data.text import TokenWindows, load_text, tokenize  # noqa: E402
from lowbit.llm.evaluate import logits_of  # noqa: E402
from lowbit.llm.pipeline import TextSetup, evaluate_lm, finetune_lm, load_model, quantize_lm, windows  # noqa: E402
from lowbit.llm.sink_prefix import attach_sink_prefix  # noqa: E402
from lowbit.qat.config import FinetuneConfig  # noqa: E402
from lowbit.quant.base import Quantizer  # noqa: E402
from lowbit.recipe import load_recipe  # noqa: E402

SEED = 0
STORE = ROOT / "docs" / "results" / "llm.json"
WIDTHS = ["w8a8kv8", "w4a8kv8", "w4a4kv4"]
METHODS = ["float", "rtn", "ptq", "silq"]
PTQ_METHODS = ("rtn", "ptq")
TEXT = {  # what each model is measured on
    "bytellama": TextSetup(corpora=("shakespeare", "python-docs"), length=256, calib_windows=8, eval_windows=32),
    "smollm2-135m": TextSetup(corpora=("shakespeare",), length=256, calib_windows=4, eval_windows=8),
    "gemma3-270m": TextSetup(corpora=("shakespeare",), length=256, calib_windows=4, eval_windows=8),
}
SWEEP = [  # (weights' lr, quantizer_lr_mult) tried at --sweep
    (1e-5, 1.0), (1e-5, 10.0), (3e-5, 10.0), (1e-4, 10.0), (1e-5, 100.0),
]
SINK_PREFIX = {"sink_prefix": "bos"}  # the sink-prefix variant's kv_cache setting
VARIANTS = {  # --variant A[+B]: changes to a recipe, by name, for the sweep (calib split) or rows of their own
    "asymmetric-activations": ("Linear inputs on an asymmetric grid (learned zero point)",
                               lambda r: {**r, "activations": asymmetric(r["activations"])}),
    "peer-points": ("embedding table and lm_head float (the torchao peer's points)",
                    lambda r: {**{k: v for k, v in r.items() if k != "embeddings"},
                               "skip": [*r.get("skip", []), "lm_head"]}),
    "sink-prefix": ("float sink prefix (BOS) in the cache",
                    lambda r: {**r, "kv_cache": {**r["kv_cache"], **SINK_PREFIX}}),
    "token-activations": ("Linear inputs with per-token min-max steps computed at run time",
                          lambda r: {**r, "activations": {"method": "minmax", "bits": r["activations"]["bits"],
                                                          "granularity": "token"}}),
}


def asymmetric(spec: dict) -> dict:
    """``spec`` on an asymmetric grid: LSQ learns a zero point (``asymmetric``); min-max takes ``symmetric: false``."""
    return {**spec, **({"asymmetric": True} if spec["method"] == "lsq" else {"symmetric": False})}


def variant_parts(variant: str | None) -> list[str]:
    parts = [p for p in (variant or "").split("+") if p]
    unknown = [p for p in parts if p not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variant: unknown {unknown}; known: {sorted(VARIANTS)} (join several with +)")
    return parts


def with_variant(recipe, variant: str | None) -> dict:
    """``recipe`` (a name or dict) with the changes of ``variant`` applied."""
    recipe = load_recipe(recipe).to_dict()
    for part in variant_parts(variant):
        recipe = VARIANTS[part][1](recipe)
    return recipe


def variant_label(variant: str | None) -> str:
    return "".join(f" + {VARIANTS[p][0]}" for p in variant_parts(variant))


# rows of the recipes before weights and embeddings started from their min-max step (commit 8f5f5ed), kept
# as measured then: the ablation behind that choice
INIT_ABLATION = ("ptq, weights init: mse", "silq, weights init: mse")
MODEL_ORDER = ["bytellama", "smollm2-135m", "gemma3-270m"]
NOTES = {"smollm2-135m": "SmolLM2's published weights are already 4-bit (Q4_1, blocks of 32): **float is the "
                         "dequantized model**, and per-channel 4-bit is the real test on it.",
         "gemma3-270m": "Gemma 3 270M (base model; 15 sliding-window and 3 global attention layers, q/k norms, a "
                        "scaled embedding table of 262,144 tokens). Its published weights are already quantized "
                        "(Q4_K_M: 4-bit Q4_K for the attention outputs and half the down projections, 5-, 6- and "
                        "8-bit blocks elsewhere): **float is the dequantized model**. That model is overconfident "
                        "on this text (its own logits divided by a temperature above 1 score a lower perplexity), so "
                        "a quantized model with flatter predictions can score a perplexity below float's: KL and "
                        "agreement, not perplexity, say how close a row stays to the float model."}


def load_rows() -> dict[str, dict]:
    return load_keyed_rows(STORE)


def save_row(key: str, row: dict) -> None:
    store_keyed_row(STORE, key, row)


def measured(model, tokenizer, text: TextSetup, teacher) -> dict:
    test = evaluate_lm(model, tokenizer, text, teacher=teacher)
    calib = evaluate_lm(model, tokenizer, text, teacher=teacher, split="calib")
    return {"perplexity": test["perplexity"], "kl": test.get("kl"), "agreement": test.get("agreement"),
            "calib_perplexity": calib["perplexity"], "windows": text.eval_windows, "length": text.length,
            "corpora": list(text.corpora)}


def chosen_setting(model_name: str, variant: str | None = None) -> tuple[float, float] | None:
    """The (lr, quantizer_lr_mult) of the stored sweep row with the lowest calib perplexity: among the sweeps of
    ``variant`` where there are any, else among those of the recipe itself."""
    sweeps = [r for r in load_rows().values() if r["model"] == model_name and r["method"] == "sweep"]
    mine = [r for r in sweeps if (r.get("variant") or None) == variant] or [r for r in sweeps if not r.get("variant")]
    if not mine:
        return None
    best = min(mine, key=lambda r: r["calib_perplexity"])
    return best["lr"], best["quantizer_lr_mult"]


def silq_config(width: str, args, lr: float | None, mult: float | None) -> FinetuneConfig:
    cfg = FinetuneConfig.from_recipe(f"silq-{width}", batch_size=args.batch_size, seed=SEED, progress=False,
                                     lr=lr, quantizer_lr_mult=mult)
    tokens = args.steps * args.batch_size * args.length
    return cfg.replace(max_tokens=tokens, max_steps=args.steps, log_every=max(1, args.steps // 10),
                       warmup_steps=min(cfg.warmup_steps, max(1, args.steps // 10)), checkpoint_every=0,
                       compile_quantizers=args.compile_quantizers)


def run_silq(model, tokenizer, text, width, args, lr=None, mult=None, split_eval=True, variant=None) -> dict:
    cfg = silq_config(width, args, lr, mult)
    start = time.perf_counter()
    qmodel = quantize_lm(model, tokenizer, with_variant(f"silq-{width}", variant), text)
    result = finetune_lm(qmodel, model, tokenizer, text, config=cfg, log=lambda s: print(s, flush=True))
    minutes = (time.perf_counter() - start) / 60
    row = {"steps": result["steps"], "tokens": result["tokens"], "batch": cfg.batch_size, "lr": cfg.lr,
           "quantizer_lr_mult": cfg.quantizer_lr_mult, "compile_quantizers": cfg.compile_quantizers,
           "minutes": round(minutes, 1)}
    row.update(measured(qmodel, tokenizer, text, model) if split_eval else
               {"calib_perplexity": evaluate_lm(qmodel, tokenizer, text, teacher=model, split="calib")["perplexity"]})
    return row


def run_methods(name: str, args) -> None:
    text = TextSetup(**{**TEXT[name].__dict__, "length": args.length})
    model, tokenizer = load_model(name)
    methods = [m for m in args.methods.split(",") if m]
    variant = args.variant or None
    tail = f"/{variant}" if variant else ""
    if "float" in methods:
        prefixed = "sink-prefix" in variant_parts(variant)
        floating = model
        if prefixed:  # the float model after the same prefix: what the prefix alone changes
            floating = copy.deepcopy(model)
            attach_sink_prefix(floating, SINK_PREFIX)
        save_row(f"{name}/float" + ("/sink-prefix" if prefixed else ""), {
            "model": name, "method": "float", "width": "fp32", "steps": 0, "tokens": 0, "minutes": 0.0,
            "variant": "sink-prefix" if prefixed else None,
            **measured(floating, tokenizer, text, model if prefixed else None)})
    for width in [w for w in args.widths.split(",") if w]:
        for method in [m for m in methods if m in PTQ_METHODS]:
            start = time.perf_counter()
            qmodel = quantize_lm(model, tokenizer, with_variant(f"{method}-{width}", variant), text)
            minutes = (time.perf_counter() - start) / 60
            save_row(f"{name}/{method}/{width}{tail}", {"model": name, "method": method, "width": width, "steps": 0,
                                                        "tokens": 0, "minutes": round(minutes, 1), "variant": variant,
                                                        **measured(qmodel, tokenizer, text, model)})
            del qmodel
        if "silq" in methods:
            setting = chosen_setting(name, variant) or (None, None)
            row = run_silq(model, tokenizer, text, width, args, *setting, variant=variant)
            save_row(f"{name}/silq/{width}/{args.steps}" + (f"/{variant}" if variant else ""),
                     {"model": name, "method": "silq", "width": width, "variant": variant,
                      "chosen_by_sweep": setting != (None, None), **row})


def run_sweep(name: str, args) -> None:
    """Each SWEEP setting at ``args.width``, scored on the calib split (no test-split number is read)."""
    text = TextSetup(**{**TEXT[name].__dict__, "length": args.length})
    model, tokenizer = load_model(name)
    settings = SWEEP if not args.sweep_settings else [tuple(float(v) for v in item.split(":"))
                                                      for item in args.sweep_settings.split(",")]
    variant = args.variant or None
    for lr, mult in settings:
        row = run_silq(model, tokenizer, text, args.sweep_width, args, lr, mult, split_eval=False, variant=variant)
        save_row(f"{name}/sweep/{args.sweep_width}/{args.steps}/{lr:g}/{mult:g}" + (f"/{variant}" if variant else ""),
                 {"model": name, "method": "sweep", "width": args.sweep_width, "variant": variant, **row})


def _only(recipe: dict, keep: set[str], float_layers: tuple[str, ...] = ()) -> dict:
    """``recipe`` with only the quantization points in ``keep`` (weights, activations, kv_cache, embeddings), and the
    Linear inputs of the layers matching ``float_layers`` left float."""
    out = {k: (v if k in keep else None) for k, v in recipe.items() if k in ("weights", "activations", "kv_cache",
                                                                              "embeddings")}
    layers = {pattern: {k: v for k, v in over.items() if k in keep} for pattern, over in recipe.get("layers", {}).items()}
    layers = {pattern: over for pattern, over in layers.items() if over}
    layers.update({pattern: {"activations": None} for pattern in float_layers})
    return {**out, "name": recipe["name"] + " (points)", "layers": layers}


POINTS = [  # (label, points kept, Linear inputs left float): --points
    ("every point (the PTQ recipe)", {"weights", "activations", "kv_cache", "embeddings"}, ()),
    ("weights of the Linear layers only", {"weights"}, ()),
    ("Linear inputs only", {"activations"}, ()),
    ("Linear inputs only, down_proj inputs float", {"activations"}, ("*.down_proj",)),
    ("Linear inputs only, o_proj inputs float", {"activations"}, ("*.o_proj",)),
    ("Linear inputs only, q/k/v inputs float", {"activations"}, ("*.q_proj", "*.k_proj", "*.v_proj")),
    ("Linear inputs only, gate/up inputs float", {"activations"}, ("*.gate_proj", "*.up_proj")),
    ("KV cache only", {"kv_cache"}, ()),
    ("embedding table only", {"embeddings"}, ()),
]


def run_points(name: str, args) -> None:
    """Which quantization point of ``ptq-<width>`` costs the most: each alone (or with some Linear inputs left
    float), post-training, scored on the calib split; and the largest input of every down_proj against its RMS,
    with the window positions where it occurs."""
    text = TextSetup(**{**TEXT[name].__dict__, "length": args.length})
    model, tokenizer = load_model(name)
    recipe = load_recipe(f"ptq-{args.sweep_width}").to_dict()
    for label, keep, float_layers in POINTS:
        qmodel = quantize_lm(model, tokenizer, _only(recipe, keep, float_layers), text)
        m = evaluate_lm(qmodel, tokenizer, text, teacher=model, split="calib")
        save_row(f"{name}/points/{args.sweep_width}/{label}", {"model": name, "method": "points", "width":
                 args.sweep_width, "label": label, "calib_perplexity": m["perplexity"], "kl": m["kl"],
                 "agreement": m["agreement"]})
    peaks = {}

    def record(layer_name):
        def hook(module, inputs, output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            per_token = x.abs().amax(1)
            peaks[layer_name] = {"max": float(per_token.max()), "rms": float(x.pow(2).mean().sqrt()),
                                 "position": int(per_token.argmax()) % args.length}
        return hook
    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n.endswith("down_proj")]
    with torch.no_grad():
        model(windows(tokenizer, text, "calib", text.calib_windows))
    for h in handles:
        h.remove()
    save_row(f"{name}/points/down_proj_peaks", {"model": name, "method": "peaks", "width": "fp32", "peaks": peaks})


def points_lines(rows: list[dict]) -> str:
    fp = next((r["calib_perplexity"] for r in rows if r["method"] == "float"), None)
    order = [label for label, _, _ in POINTS]
    points = sorted([r for r in rows if r["method"] == "points"], key=lambda r: order.index(r["label"]))
    lines = [f"| quantized (post-training, {points[0]['width']}) | calib perplexity | KL | agreement (%) |",
             "|---|---:|---:|---:|"]
    if fp is not None:
        lines.append(f"| nothing (float) | {fp:.3f} |  |  |")
    for r in points:
        lines.append(f"| {r['label']} | {r['calib_perplexity']:.3f} | {r['kl']:.4f} | {r['agreement']:.2f} |")
    peaks = next((r["peaks"] for r in rows if r["method"] == "peaks"), None)
    if peaks:
        worst = sorted(peaks.items(), key=lambda kv: -kv[1]["max"] / kv[1]["rms"])[:6]
        lines.append("\nLargest down_proj inputs (max |x| over RMS, calibration windows): " + "; ".join(
            f"`{n}` {p['max']:,.0f} ({p['max'] / p['rms']:.0f}x RMS, window position {p['position']})"
            for n, p in worst) + ".")
    return "\n".join(lines)


def run_speed(name: str, args) -> None:
    """Median time of one fine-tuning step (forward, KL to the teacher, backward, AdamW) of the float
    model and of the SiLQ W4A8KV8 model, same batch, measurements interleaved."""
    text = TextSetup(**{**TEXT[name].__dict__, "length": args.length})
    model, tokenizer = load_model(name)
    student = quantize_lm(model, tokenizer, "silq-w4a8kv8", text)
    for q in student.modules():
        if isinstance(q, Quantizer):
            q.fused = args.compile_quantizers  # as finetune(compile_quantizers=...) sets it
    float_student = copy.deepcopy(model)
    ids = next(iter(TokenWindows(tokenize(tokenizer, load_text(list(text.corpora), "train")), args.length,
                                 args.batch_size, seed=SEED)))
    teacher = model.eval()

    def step_fn(net):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
        net.train()

        def step() -> float:
            start = time.perf_counter()
            with torch.no_grad():
                t = logits_of(teacher, ids)
            s = logits_of(net, ids)
            loss = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                              reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return time.perf_counter() - start
        return step

    steps = {"float": step_fn(float_student), "silq-w4a8kv8": step_fn(student)}
    times = {k: [] for k in steps}
    for i in range(args.speed_steps + 2):
        for k, fn in steps.items():
            t = fn()
            if i >= 2:
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    save_row(f"{name}/speed/{args.batch_size}x{args.length}" + ("/compiled" if args.compile_quantizers else ""),
             {"model": name, "method": "speed", "width": "w4a8kv8", "batch": args.batch_size, "length": args.length,
              "compile_quantizers": args.compile_quantizers,
              "float_step_seconds": round(med["float"], 3), "silq_step_seconds": round(med["silq-w4a8kv8"], 3),
              "ratio": round(med["silq-w4a8kv8"] / med["float"], 3), "measured_steps": args.speed_steps})


# ----- the section ------------------------------------------------------------------------------
def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def model_table(rows: list[dict]) -> str:
    floats = [r for r in rows if r["method"] == "float" and not r.get("variant")]
    fp = floats[0]["perplexity"] if floats else None
    lines = ["| width | method | perplexity (test) | KL | agreement (%) | calib perplexity | steps | tokens | "
             "minutes | gap closed vs RTN | commit |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    order = {m: i for i, m in enumerate(["float", "rtn", "ptq", "silq", *INIT_ABLATION, "torchao-ptq", "torchao-qat",
                                         "torchao-converted"])}
    shown = [r for r in rows if r["method"] in order]
    best = {}
    for r in rows:
        if r["method"] in PTQ_METHODS and not r.get("variant") and (
                r["width"] not in best or r["calib_perplexity"] < best[r["width"]]["calib_perplexity"]):
            best[r["width"]] = r
    widths = ["fp32"] + WIDTHS + sorted({r["width"] for r in shown} - set(WIDTHS) - {"fp32"})
    for r in sorted(shown, key=lambda r: (widths.index(r["width"]), order[r["method"]], r.get("steps", 0),
                                          r.get("variant") or "")):
        rtn = next((x for x in rows if x["method"] == "rtn" and x["width"] == r["width"] and not x.get("variant")),
                   None)
        closed = ""
        if fp is not None and rtn is not None and r["method"] not in ("float", "rtn") and rtn["perplexity"] != fp:
            closed = f"{100 * (rtn['perplexity'] - r['perplexity']) / (rtn['perplexity'] - fp):.0f}%"
        method = (r["method"] + variant_label(r.get("variant"))
                  + (" (best PTQ)" if best.get(r["width"]) is r else ""))
        lines.append(f"| {r['width']} | {method} | {r['perplexity']:.3f} | {_fmt(r.get('kl'), '.4f')} | "
                     f"{_fmt(r.get('agreement'), '.2f')} | {_fmt(r.get('calib_perplexity'), '.3f')} | "
                     f"{r.get('steps', 0)} | {r.get('tokens', 0):,} | {r.get('minutes', 0):.1f} | {closed} | "
                     f"{r['commit']} |")
    return "\n".join(lines)


def sweep_table(rows: list[dict]) -> str:
    lines = ["| width | recipe | steps | weights' lr | steps' lr multiplier | calib perplexity |",
             "|---|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["width"], r["steps"], r["calib_perplexity"])):
        recipe = f"silq-{r['width']}" + variant_label(r.get("variant"))
        lines.append(f"| {r['width']} | {recipe} | {r['steps']} | {r['lr']:g} | {r['quantizer_lr_mult']:g} | "
                     f"{r['calib_perplexity']:.3f} |")
    return "\n".join(lines)


def speed_lines(rows: list[dict]) -> str:
    return "\n".join(f"- fine-tuning step, batch {r['batch']}x{r['length']}: float {r['float_step_seconds']:.2f} s, "
                     f"SiLQ W4A8KV8 {r['silq_step_seconds']:.2f} s"
                     f"{' (fake-quant compiled: compile_quantizers)' if r.get('compile_quantizers') else ''}: "
                     f"**{r['ratio']:.2f}x** (median of "
                     f"{r['measured_steps']} steps, interleaved; commit {r['commit']})" for r in rows)


def commands(model: str, rows: list[dict]) -> str:
    """The commands that rerun the fine-tuned rows of ``model`` (its PTQ and float rows come with them)."""
    runs = sorted({(r["method"].startswith("torchao"), r["steps"], r.get("batch"), r["width"], r.get("variant") or "")
                   for r in rows if r.get("steps") and r["method"] in ("silq", "torchao-qat")})
    shown = []
    for peer, steps, batch, width, variant in runs:
        if peer:
            shown.append(f"`.venv-torchao/bin/python benchmarks/torchao_peer.py --model {model} --steps {steps}`")
        else:
            shown.append(f"`python benchmarks/llm.py --model {model} --steps {steps} --batch-size {batch} "
                         f"--widths {width}{f' --variant {variant}' if variant else ''}`")
    return ("Rows from " + ", ".join(dict.fromkeys(shown)) + ".") if shown else ""


def section(rows: dict[str, dict]) -> str:
    models = sorted({r["model"] for r in rows.values()}, key=lambda m: (MODEL_ORDER + [m]).index(m))
    parts = ["Perplexity, KL(float || quantized) per token and next-token top-1 agreement with the float model on "
             "fixed windows of the test split (documents never trained on, nor used for any choice); calib "
             "perplexity is the validation number every choice was made on. \"gap closed vs RTN\" is "
             "(RTN - row) / (RTN - float) in perplexity at the same width. Minutes: calibration plus fine-tuning on "
             "this CPU (one thread, shared with other jobs: upper bounds). Recipes: `lowbit/recipes/rtn-*`, "
             "`ptq-*`, `silq-*`."]
    for m in models:
        mine = [r for r in rows.values() if r["model"] == m]
        text = next((r for r in mine if r.get("windows")), mine[0])
        parts.append(f"### {m}\n\n" + (NOTES.get(m, "") + "\n\n" if m in NOTES else "")
                     + f"Test windows: {text.get('windows')} x {text.get('length')} tokens of "
                     f"{', '.join(text.get('corpora', []))}. {commands(m, mine)}\n\n" + model_table(mine))
        sweeps = [r for r in mine if r["method"] == "sweep"]
        if sweeps:
            parts.append("Choices: learning rates and recipe variants (calib split only):\n\n" + sweep_table(sweeps))
        points = [r for r in mine if r["method"] in ("points", "peaks")]
        if points:
            parts.append("Which quantization point costs the most (`--points`: each alone, post-training, calib "
                         "split). Where a window's first token carries the attention sink, a few down_proj inputs reach "
                         "hundreds of times their RMS (last line): one static step per tensor must then either clip "
                         "that token or round every other token coarsely.\n\n" + points_lines([r for r in mine if r["method"] == "float"] + points))
        speed = [r for r in mine if r["method"] == "speed"]
        if speed:
            parts.append("Speed:\n\n" + speed_lines(speed))
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bytellama", help="bytellama, smollm2-135m or gemma3-270m")
    ap.add_argument("--methods", default=",".join(METHODS), help="float,rtn,ptq,silq ('' rebuilds the section)")
    ap.add_argument("--widths", default=",".join(WIDTHS))
    ap.add_argument("--steps", type=int, default=200, help="SiLQ fine-tuning steps")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per step")
    ap.add_argument("--length", type=int, default=256, help="tokens per window")
    ap.add_argument("--sweep", action="store_true", help="run the learning-rate sweep (calib split) instead")
    ap.add_argument("--sweep-width", default="w4a8kv8")
    ap.add_argument("--variant", default="",
                    help=f"changes to the recipes ({', '.join(VARIANTS)}; join several with +), at --sweep or for "
                         "the rows of --methods (kept apart from the recipes' own rows)")
    ap.add_argument("--sweep-settings", default="",
                    help="LR:MULT,... (weights' learning rate : quantizer_lr_mult) instead of the default sweep")
    ap.add_argument("--points", action="store_true",
                    help="ablate the quantization points of ptq-<--sweep-width> one by one (calib split) instead")
    ap.add_argument("--speed", action="store_true", help="measure the step-cost ratio instead")
    ap.add_argument("--speed-steps", type=int, default=5)
    ap.add_argument("--compile-quantizers", action="store_true",
                    help="fine-tune (and time) with the fake-quant kernels compiled (qat.compile_quantizers)")
    args = ap.parse_args()
    variant_parts(args.variant)
    torch.manual_seed(SEED)
    if args.sweep:
        run_sweep(args.model, args)
    elif args.speed:
        run_speed(args.model, args)
    elif args.points:
        run_points(args.model, args)
    elif args.methods:
        run_methods(args.model, args)
    write_section("llm", "Language models: SiLQ quantization-aware training", section(load_rows()), SEED)


if __name__ == "__main__":
    main()
