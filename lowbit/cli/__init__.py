"""The ``lowbit`` command line: a thin layer over the Python API.

    lowbit summary --model resnet20 --recipe ptq-w8a8
    lowbit ptq     --model resnet20 --recipe ptq-w4a4-aciq --out runs/ptq
    lowbit qat     --model resnet20 --recipe lsq-w4a4 --checkpoint-dir runs/lsq4 [--resume]
    lowbit mixed   --model resnet20 --method eagl --budgets 0.5,0.75 --out runs/mixed
    lowbit export  --model resnet20 --recipe ptq-w4a4-aciq --out runs/deploy [--format both] [--verify 1000]
    lowbit train   --model resnet20 --dataset fashion-mnist --epochs 24 [--out runs/resnet20.safetensors]
    lowbit demo    [--quick] [--out lowbit-demo]
    lowbit rl      teach|distill|eval|play --game breakout ...   (lowbit.cli.rl)
    lowbit llm     quantize|finetune|eval|generate|export|train ...   (language models: lowbit.cli.llm)

``python -m lowbit`` is the same command. Each command's work is a function of the Python API
(or of a small module here, for the commands that also load data and build zoo models).

Errors lowbit raises on purpose (bad recipe, missing data, wrong checkpoint) print one
line on stderr and exit with status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import lowbit
from lowbit.checkpoint import save_checkpoint
from lowbit.cli import llm, rl
from lowbit.cli.export import run_export
from lowbit.data.datasets import dataset_info, make_loader
from lowbit.demo import run_demo
from lowbit.errors import LowbitError
from lowbit.evaluate import evaluate
from lowbit.mixed.command import run_mixed
from lowbit.qat.pipeline import run_qat
from lowbit.train import TrainConfig, train_fp
from lowbit.zoo import build_model, checkpoint_path, create_model


def cmd_summary(args) -> None:
    model = build_model(args.model, args.weights, args.dataset)
    calib = make_loader(args.dataset, "calib", 128, limit=args.calib_images, data_dir=args.data_dir) \
        if args.calib_images else None
    qmodel = lowbit.quantize(model, args.recipe, calib_data=calib)
    print(lowbit.summary(qmodel))


def train_output(model: str, dataset: str, out: str | None, into_zoo: bool) -> Path:
    """Where ``lowbit train`` writes: ``--out``, the zoo's shipped file with ``--into-zoo``, else a run folder.

    Raises :class:`LowbitError` when both are given, or when ``--out`` names the zoo's own file
    without ``--into-zoo`` (overwriting a shipped checkpoint must be asked for by name).
    """
    shipped = checkpoint_path(model, dataset)
    if into_zoo:
        if out is not None:
            raise LowbitError("--into-zoo writes the shipped checkpoint; drop --out, or drop --into-zoo")
        return shipped
    path = Path(out) if out is not None else Path("lowbit-train") / f"{model}-{dataset}.safetensors"
    if path.resolve() == shipped.resolve():
        raise LowbitError(f"{path} is the shipped checkpoint of {model!r}; pass --into-zoo to replace it")
    return path


def cmd_train(args) -> None:
    out = train_output(args.model, args.dataset, args.out, args.into_zoo)
    info = dataset_info(args.dataset)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      augment=args.augment, seed=args.seed)
    model = create_model(args.model, in_channels=info.in_channels, num_classes=info.num_classes,
                         in_size=info.image_size)
    meta = train_fp(model, args.dataset, cfg, data_dir=args.data_dir)
    meta.update(model=args.model, date=datetime.date.today().isoformat(),
                command="lowbit " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    save_checkpoint(model, out, meta)
    print(f"saved {out} (test top-1 {meta['test_top1']:.2f}%)")


def cmd_ptq(args) -> None:
    model = build_model(args.model, args.weights, args.dataset)
    calib = make_loader(args.dataset, "calib", 128, limit=args.calib_images, data_dir=args.data_dir)
    start = time.perf_counter()
    qmodel = lowbit.quantize(model, args.recipe, calib_data=calib)
    seconds = time.perf_counter() - start
    print(lowbit.summary(qmodel))
    if args.evaluate:
        test = make_loader(args.dataset, "test", 500, data_dir=args.data_dir)
        fp, q = evaluate(model, test)["top1"], evaluate(qmodel, test)["top1"]
        print(f"test top-1: fp32 {fp:.2f}%  quantized {q:.2f}%  ({q - fp:+.2f})")
    print(f"calibration + quantization: {seconds:.2f} s on {args.calib_images} images")
    if args.out:
        lowbit.save(qmodel, args.out, model_name=args.model, dataset=args.dataset)
        print(f"saved {args.out} (reload with lowbit.load)")


def cmd_qat(args) -> None:
    model = build_model(args.model, args.weights, args.dataset)
    run_qat(model, model_name=args.model, dataset=args.dataset, recipe=args.recipe, epochs=args.epochs, lr=args.lr,
            batch_size=args.batch_size, max_steps=args.max_steps, seed=args.seed, distill=args.distill,
            checkpoint_dir=args.checkpoint_dir, resume=args.resume,
            calib_images=args.calib_images, data_dir=args.data_dir,
            augment=True if args.augment is None and args.weights else args.augment, progressive=args.progressive)


def cmd_mixed(args) -> None:
    model = build_model(args.model, args.weights, args.dataset)
    run_mixed(model, dataset=args.dataset, model_name=args.model, method=args.method, budgets=args.budgets,
              recipe=args.recipe, precisions=args.precisions, metric=args.metric, fixed_bits=args.fixed_bits,
              weighting=args.weighting, steps=args.steps, alps_steps=args.alps_steps, random_draws=args.random_draws,
              uniform_bits=args.uniform_bits, train_images=args.train_images, calib_images=args.calib_images,
              alps_eval_images=args.alps_eval_images, test_images=args.test_images, batch_size=args.batch_size,
              augment=args.augment, seed=args.seed, out=args.out, cache_dir=args.cache_dir, shard=args.shard,
              select_only=args.select_only, additivity=args.additivity, data_dir=args.data_dir)


def cmd_export(args) -> None:
    run_export(model_name=args.model, weights=args.weights, dataset=args.dataset, recipe=args.recipe,
               quantized=args.quantized, calib_images=args.calib_images, out=args.out, fmt=args.format,
               float_bias=args.float_bias, quantize_residual=args.quantize_residual, verify=args.verify,
               data_dir=args.data_dir)


def cmd_demo(args) -> None:
    run_demo(args.out, model_name=args.model, quick=args.quick, calib_images=args.calib_images)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize PyTorch models to 2-8 bits and prove "
                                "they run in integer arithmetic.")
    p.add_argument("--version", action="version", version=f"lowbit {lowbit.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(sp):
        sp.add_argument("--model", default="resnet20", help="zoo model name (default: resnet20)")
        sp.add_argument("--weights", help="weights to load instead of the shipped checkpoint (.safetensors or .pt)")
        sp.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default) or digits")

    def data_dir_arg(sp):
        sp.add_argument("--data-dir", help="folder with the dataset files (default: $LOWBIT_FASHION_MNIST, else the "
                        "system location /usr/share/datasets/fashion-mnist)")

    sp = sub.add_parser("summary", help="quantize a model with a recipe and print the per-layer table")
    model_args(sp)
    sp.add_argument("--recipe", default="ptq-w8a8", help="recipe YAML path or shipped recipe name")
    sp.add_argument("--calib-images", type=int, default=0, help="calibrate on this many held-out training images")
    data_dir_arg(sp)
    sp.set_defaults(func=cmd_summary)

    sp = sub.add_parser("ptq", help="post-training quantization: calibrate, quantize, evaluate, save")
    model_args(sp)
    sp.add_argument("--recipe", default="ptq-w4a4-aciq", help="recipe YAML path or shipped recipe name "
                    "(default: ptq-w4a4-aciq: ACIQ + bit allocation + bias correction)")
    sp.add_argument("--calib-images", type=int, default=512, help="held-out training images to calibrate on")
    data_dir_arg(sp)
    sp.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                    help="measure test accuracy of the float and quantized models")
    sp.add_argument("--out", help="folder to save the quantized model in")
    sp.set_defaults(func=cmd_ptq)

    sp = sub.add_parser("qat", help="quantization-aware fine-tuning (FAQ, LSQ, PACT+SAWB recipes; torchrun for DDP)")
    model_args(sp)
    sp.add_argument("--recipe", default="lsq-w4a4", help="recipe YAML path or shipped recipe name (default: "
                    "lsq-w4a4); its qat: section holds the training settings")
    sp.add_argument("--epochs", type=int, help="override the recipe's epochs")
    sp.add_argument("--lr", type=float, help="override the recipe's learning rate")
    sp.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    sp.add_argument("--max-steps", type=int, help="stop after this many steps (a short trial run)")
    sp.add_argument("--seed", type=int, help="override the recipe's seed")
    sp.add_argument("--distill", "--teacher", dest="distill", action=argparse.BooleanOptionalAction, default=False,
                    help="distil from the float model (default: off, as the QAT rows of docs/RESULTS.md were run)")
    sp.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                    help="crop/flip the training images (default: as the zoo checkpoint was trained; on with --weights)")
    sp.add_argument("--checkpoint-dir", help="checkpoints, metrics.jsonl and the fine-tuned model "
                    "(default: lowbit-qat/MODEL-RECIPE)")
    sp.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    sp.add_argument("--progressive", type=lambda text: [int(b) for b in text.split(",")], default=None,
                    metavar="BITS[,BITS]", help="progressive lowering: fine-tune at these widths first, each stage "
                    "with the recipe's settings (e.g. 4 before a W2A2 recipe; lowbit.qat.progressive)")
    sp.add_argument("--calib-images", type=int, default=512, help="held-out training images to calibrate on")
    data_dir_arg(sp)
    sp.set_defaults(func=cmd_qat)

    sp = sub.add_parser("mixed", help="mixed precision: choose 4/2-bit layers under a budget (EAGL, ALPS), "
                        "fine-tune and plot the accuracy-cost frontier")
    model_args(sp)
    sp.add_argument("--method", choices=["eagl", "alps", "random", "uniform"], default="eagl",
                    help="eagl: weight entropy, no data (default); alps: one short fine-tune per layer; "
                    "random: random selections; uniform: uniform models only")
    sp.add_argument("--budgets", default="0.5", help="comma-separated fractions of the all-high-precision cost "
                    "(default 0.5)")
    sp.add_argument("--recipe", default="lsq-w4a4", help="base recipe: quantizers and qat: settings (default "
                    "lsq-w4a4)")
    sp.add_argument("--precisions", default="4,2", help="candidate precisions, e.g. 4,2 or w4a4,w2a2 or 4,3,2")
    sp.add_argument("--metric", choices=["bitops", "size"], default="bitops",
                    help="cost: bit-operations (MACs x w_bits x a_bits) or stored weight bits")
    sp.add_argument("--fixed-bits", type=int, default=8, help="bits of the first and last layers (default 8)")
    sp.add_argument("--weighting", default="none", help="EAGL weighting: none, params, log_params, macs")
    sp.add_argument("--steps", type=int, default=300, help="fine-tuning steps per frontier point (0: PTQ only)")
    sp.add_argument("--alps-steps", type=int, default=100, help="fine-tuning steps per ALPS run")
    sp.add_argument("--random-draws", type=int, default=3, help="random selections per budget (the baseline)")
    sp.add_argument("--uniform-bits", default="2,3,4", help="uniform precisions to add as reference points")
    sp.add_argument("--train-images", type=int, help="fine-tune on the first N training images (default: all)")
    sp.add_argument("--calib-images", type=int, default=512, help="held-out images to calibrate activations on")
    sp.add_argument("--alps-eval-images", type=int, default=1000, help="held-out images ALPS measures accuracy on")
    sp.add_argument("--test-images", type=int, help="evaluate on the first N test images (default: all)")
    sp.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    sp.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                    help="crop/flip the training images while fine-tuning (default: off)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the selections, calibration and fine-tuning")
    sp.add_argument("--out", default="lowbit-mixed", help="folder for recipes, frontier.json/.md/.png")
    sp.add_argument("--cache-dir", help="ALPS cache folder (default: OUT/alps-cache)")
    sp.add_argument("--shard", help="ALPS only: run part i of n (0-based, 'i/n') into the cache and stop")
    sp.add_argument("--additivity", type=int, default=0, help="ALPS: check additivity on N held-out combinations")
    sp.add_argument("--select-only", action="store_true", help="write the chosen recipes without fine-tuning")
    data_dir_arg(sp)
    sp.set_defaults(func=cmd_mixed)

    sp = sub.add_parser("export", help="write a quantized model as packed integers + manifest, and/or ONNX QDQ")
    model_args(sp)
    sp.add_argument("--recipe", default="ptq-w8a8", help="recipe to quantize with (default: ptq-w8a8)")
    sp.add_argument("--quantized", help="export a folder saved by `lowbit ptq/qat --out` instead of quantizing")
    sp.add_argument("--calib-images", type=int, default=512, help="held-out training images to calibrate on")
    sp.add_argument("--out", required=True, help="folder to write model.safetensors + manifest.json / model.onnx")
    sp.add_argument("--format", choices=("lowbit", "onnx", "both"), default="lowbit",
                    help="lowbit: packed integers + manifest (default); onnx: QDQ model.onnx; both")
    sp.add_argument("--float-bias", action=argparse.BooleanOptionalAction, default=True,
                    help="store float32 biases beside the int32 ones (default; bit-identical reload, exact bias in "
                    "the integer engine); --no-float-bias writes the smallest file")
    sp.add_argument("--quantize-residual", action="store_true",
                    help="ONNX: quantize residual additions to 8 bits too, so onnxruntime fuses every conv (faster, "
                    "not bit-faithful to the fake-quant model)")
    sp.add_argument("--verify", type=int, default=0, metavar="N",
                    help="run the integer engine / onnxruntime on N test images and compare with the fake-quant model")
    data_dir_arg(sp)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("train", help="train a zoo model in full precision (reproducible, seeded)")
    sp.add_argument("--model", required=True, help=f"zoo model to train: {', '.join(lowbit.zoo.list_models())}")
    sp.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default) or digits")
    sp.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    sp.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    sp.add_argument("--lr", type=float, default=0.2, help="peak learning rate of the cosine schedule (default 0.2)")
    sp.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay on conv/linear weights "
                    "(default 5e-4)")
    sp.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                    help="random 2-pixel translation + horizontal flip (default: on)")
    sp.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default 0)")
    sp.add_argument("--out", help="checkpoint path (default: lowbit-train/MODEL-DATASET.safetensors)")
    sp.add_argument("--into-zoo", action="store_true",
                    help="replace the checkpoint shipped inside the lowbit package (for maintainers)")
    data_dir_arg(sp)
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("demo", help="quantize the default model with every method and write a results table")
    sp.add_argument("--model", default="resnet20", help="zoo model to quantize (default: resnet20)")
    sp.add_argument("--out", default="lowbit-demo", help="folder for results.json/.md and the plot "
                    "(default: lowbit-demo)")
    sp.add_argument("--quick", action="store_true", help="2,000 test images: under a minute")
    sp.add_argument("--calib-images", type=int, default=512, help="held-out training images to calibrate on "
                    "(default 512)")
    sp.set_defaults(func=cmd_demo)

    llm.register(sub)
    rl.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv  # the command as given, for the files that record it
    try:
        args.func(args)
    except LowbitError as exc:
        print(f"lowbit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
