"""Packed int4/int8 CPU inference of a quantized causal LM against the float model: generation speed and memory.

    python benchmarks/llm_packed.py                                   # bytellama and SmolLM2-135M, W4A8KV8
    python benchmarks/llm_packed.py --models smollm2-135m --recipe rtn-w8a8kv8
    python benchmarks/llm_packed.py --models ''                       # rebuild the section from the rows

Protocol, per model. The float model is quantized with ``--recipe`` (calibrated on ``--calib-windows``
windows of the calib split; speed and memory do not depend on fine-tuning), exported with
``lowbit.export`` and loaded back (``lowbit.load_export``): the *fake-quant* model. ``lowbit.deploy.pack_model``
turns that into two packed models (lowbit.deploy.packed): *int4* (4-bit codes two per byte in torch's
CPU int4 layout, run by ``_weight_int4pack_mm_for_cpu``; 8-bit layers as int8) and *int8* (every weight
as int8, run by ``torch._int_mm``).

- agreement: the reloaded export's logits against the quantized model's (bit-identical expected), and each
  packed model's against the fake-quant one on ``--eval-windows`` test-split windows (max |difference|
  relative to max |logit|, next-token top-1 agreement), with the perplexity of each. The control: the
  same fake-quant model run in float64, against itself in float32. A chain of quantizers is
  discontinuous (a rounding-level change of one layer's output can move the next layer's activation
  code by a step), so no implementation other than the very same float32 arithmetic agrees better
  than the control does; a packed kernel that agrees about as well is as faithful as float arithmetic;
- speed: greedy ``generate()`` of ``--new-tokens`` tokens after a fixed test-split prompt (the prompt's
  prefill included in the time), float, int4, int8 and fake-quant runs interleaved, ``--repeats`` times
  after one warm-up each; the median tokens/s;
- memory: bytes of every parameter and buffer the model holds (shared tensors once), and the resident
  set of a fresh process that builds only that model (``VmRSS`` after one generation, after freeing
  everything else and ``malloc_trim``; ``VmHWM`` is the peak, which for the packed models includes the
  float model they are loaded into: ``lowbit.load_export(folder, model, packed=kernel)``).

Threads: ``--threads`` (default 1; the machine is shared). Rows go to docs/results/llm_packed.json
(with the commit), the 'llm-packed' section of docs/RESULTS.md is rebuilt from every stored row.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_page import ROOT, load_keyed_rows, store_keyed_row, write_section  # noqa: E402

import lowbit  # noqa: E402
from lowbit.data.text import load_text  # noqa: E402
from lowbit.llm.evaluate import measure  # noqa: E402
from lowbit.llm.generate import generate_text  # noqa: E402
from lowbit.llm.pipeline import TextSetup, load_model, quantize_lm, windows  # noqa: E402

SEED = 0
STORE = ROOT / "docs" / "results" / "llm_packed.json"
MODELS = ["bytellama", "smollm2-135m"]
CORPORA = ("shakespeare",)
PROMPT_CHARS = 120  # of the test split: the prompt of every generation
PACKED = ("int4", "int8")  # pack_model's kernels


def load_rows() -> dict[str, dict]:
    return load_keyed_rows(STORE)


def save_row(key: str, row: dict) -> None:
    store_keyed_row(STORE, key, row)


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers ``model`` holds, each storage once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def prompt_text() -> str:
    return load_text(list(CORPORA), "test")[:PROMPT_CHARS]


def build(name: str, recipe: str, calib_windows: int, folder: Path):
    """``(float, tokenizer, quantized, fake-quant reloaded)``; the export is written to ``folder``."""
    model, tokenizer = load_model(name)
    text = TextSetup(corpora=CORPORA, length=256, calib_windows=calib_windows)
    qmodel = quantize_lm(model, tokenizer, recipe, text).eval()
    lowbit.export(qmodel, folder)
    return model, tokenizer, qmodel, lowbit.load_export(folder, model=model)


def rss_kib() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def rss_child(args) -> None:
    """In a fresh process: build one variant from the export, drop the rest, generate, print RSS."""
    model, tokenizer = load_model(args.model)
    if args.rss_child in PACKED:
        run = lowbit.load_export(args.export_dir, model=model, packed=args.rss_child)
        del model
    else:
        run = model
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    generate_text(run, tokenizer, prompt_text(), 8)
    rss, peak = rss_kib()
    print(json.dumps({"rss_bytes": rss * 1024, "peak_rss_bytes": peak * 1024, "held_bytes": held_bytes(run)}))


def child_rss(name: str, variant: str, folder: Path, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-child", variant, "--model", name, "--export-dir",
                          str(folder), "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_model(name: str, args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        start = time.perf_counter()
        model, tokenizer, qmodel, loaded = build(name, args.recipe, args.calib_windows, folder)
        build_seconds = time.perf_counter() - start
        variants = {"float": model, **{k: lowbit.deploy.pack_model(loaded, k) for k in PACKED},
                    "fake-quant": loaded}
        ids = windows(tokenizer, TextSetup(corpora=CORPORA, length=256), "test", args.eval_windows)
        with torch.no_grad():
            exact = all(torch.equal(loaded(w[None]).logits, qmodel(w[None]).logits) for w in ids[:2])
            reference = loaded(ids).logits
            others = {k: variants[k](ids).logits for k in PACKED}
            others["fake-quant-fp64"] = copy.deepcopy(loaded).double()(ids).logits.float()  # the control
            agreement = {k: {"max_rel_logit_diff": float((v - reference).abs().max() / reference.abs().max()),
                             "top1_agreement": float((v.argmax(-1) == reference.argmax(-1)).float().mean() * 100)}
                         for k, v in others.items()}
        quality = {v: round(measure(m, ids)["perplexity"], 4) for v, m in variants.items()}
        del qmodel
        prompt = prompt_text()
        speeds = {v: [] for v in variants}
        for m in variants.values():  # warm-up
            generate_text(m, tokenizer, prompt, 4)
        for _ in range(args.repeats):
            for v, m in variants.items():
                speeds[v].append(generate_text(m, tokenizer, prompt, args.new_tokens)["tokens_per_second"])
        tps = {v: round(statistics.median(s), 2) for v, s in speeds.items()}
        memory = {v: child_rss(name, v, folder, args.threads) for v in ("float", *PACKED)}
        save_row(f"{name}/{args.recipe}", {
            "model": name, "recipe": args.recipe, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "tokens_per_second": tps, "speedup_vs_float": {k: round(tps[k] / tps["float"], 3) for k in PACKED},
            "held_bytes": {v: held_bytes(m) for v, m in variants.items()},
            "rss_bytes": {v: r["rss_bytes"] for v, r in memory.items()},
            "peak_rss_bytes": {v: r["peak_rss_bytes"] for v, r in memory.items()},
            "export_bytes": (folder / "model.safetensors").stat().st_size, "reloaded_bit_identical": exact,
            "vs_fake_quant": agreement, "perplexity": quality, "eval_windows": args.eval_windows,
            "build_seconds": round(build_seconds, 1)})


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def section(rows: dict[str, dict]) -> str:
    lines = ["Greedy generation after a fixed prompt (median tokens/s of interleaved runs, prefill included), "
             "weights held in memory (every parameter and buffer once), and the resident set of a fresh process "
             "holding only that model after one generation (its peak in brackets: a packed model is built from "
             "the float one). *fake-quant* is the export loaded back (`lowbit.load_export`); *int4* and *int8* "
             "are `lowbit.deploy.pack_model(model, kernel)` of it: 4-bit weights packed two per byte run by "
             "`_weight_int4pack_mm_for_cpu` (bfloat16 in and out), or every weight as int8 run by "
             "`torch._int_mm` (exact in int32); 8-bit layers (lm_head) are int8 in both. Perplexity on "
             "test-split windows of 256 tokens of shakespeare; \"vs fake-quant\": max |logit difference| / "
             "max |logit| and next-token top-1 agreement with the fake-quant model on those windows; the control "
             "is the same fake-quant model computed in float64: a chain of quantizers turns rounding-level "
             "differences into code flips, so this is the agreement any other arithmetic can expect.",
             "",
             "| model | recipe | runs | tokens/s float | int4 | int8 | fake-quant | int4 / float | int8 / float | "
             "weights float / int4 / int8 | RSS float | RSS int4 | RSS int8 | export file | "
             "perplexity float / fake-quant / int4 / int8 | int4 vs fake-quant | int8 vs fake-quant | "
             "control: fake-quant float64 vs float32 | reloaded = quantized | threads | commit |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|---|---|---|---|---|---:|---|"]
    order = {m: i for i, m in enumerate(MODELS)}
    for r in sorted(rows.values(), key=lambda r: (order.get(r["model"], 99), r["recipe"])):
        t, h, rss, peak, p, a = (r["tokens_per_second"], r["held_bytes"], r["rss_bytes"], r["peak_rss_bytes"],
                                 r["perplexity"], r["vs_fake_quant"])
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['repeats']} x {r['new_tokens']} tokens | {t['float']:.1f} | "
            f"{t['int4']:.1f} | {t['int8']:.1f} | {t['fake-quant']:.1f} | **{r['speedup_vs_float']['int4']:.2f}x** | "
            f"**{r['speedup_vs_float']['int8']:.2f}x** | {_mb(h['float'])} / {_mb(h['int4'])} / {_mb(h['int8'])} | "
            + " | ".join(f"{_mb(rss[k])} ({_mb(peak[k])})" for k in ("float", *PACKED))
            + f" | {_mb(r['export_bytes'])} | {p['float']:.3f} / {p['fake-quant']:.3f} / {p['int4']:.3f} / "
            f"{p['int8']:.3f} | "
            + " | ".join(f"{100 * a[k]['max_rel_logit_diff']:.2f}%, {a[k]['top1_agreement']:.1f}%"
                         for k in (*PACKED, "fake-quant-fp64"))
            + f" | {'bit-identical' if r['reloaded_bit_identical'] else 'differs'} | {r['threads']} | "
            f"{r['commit']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: bytellama, smollm2-135m "
                    "('' rebuilds the section from the stored rows)")
    ap.add_argument("--recipe", default="ptq-w4a8kv8", help="quantization recipe (default ptq-w4a8kv8: step 0 "
                    "of silq-w4a8kv8)")
    ap.add_argument("--calib-windows", type=int, default=4, help="calib-split windows of 256 tokens (default 4)")
    ap.add_argument("--eval-windows", type=int, default=4, help="test-split windows for perplexity (default 4)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant, interleaved (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--rss-child", choices=("float", *PACKED), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--export-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    if args.rss_child:
        rss_child(args)
        return
    for name in [m for m in args.models.split(",") if m]:
        run_model(name, args)
    rows = load_rows()
    if rows:
        write_section("llm-packed", "Language models: packed int4/int8 CPU inference", section(rows), SEED)


if __name__ == "__main__":
    main()
