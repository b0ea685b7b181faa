"""The command line and the demo, on the shipped MLP (fast) with real Fashion-MNIST."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.cli import main, parser, train_output
from lowbit.errors import LowbitError
from lowbit.demo import METHODS, run_demo
from lowbit.zoo import checkpoint_path

needs_data = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir() or
                                not checkpoint_path("mlp").is_file(), reason="Fashion-MNIST or MLP checkpoint missing")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("summary", "train", "demo", "ptq", "qat", "mixed", "export"):
        assert cmd in out


def test_export_needs_an_output_folder(capsys):
    # no command is pending any more (export: issue 7); a missing required option is a usage error
    with pytest.raises(SystemExit) as exc:
        main(["export"])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err


@needs_data
def test_summary_prints_table(capsys):
    assert main(["summary", "--model", "mlp", "--recipe", "ptq-w4a4-minmax", "--calib-images", "128"]) == 0
    out = capsys.readouterr().out
    assert "net.1" in out and "net.3" in out and "net.5" in out
    assert "4b minmax/ch" in out and "8b minmax/ch" in out
    assert "stored size" in out


@needs_data
def test_bad_recipe_is_one_clear_line(capsys):
    assert main(["summary", "--model", "mlp", "--recipe", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert "no-such-recipe" in err and "ptq-w8a8" in err and "Traceback" not in err


@needs_data
def test_demo_writes_schema(tmp_path):
    results = run_demo(tmp_path, model_name="mlp", quick=True, calib_images=256, log=lambda s: None)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk) >= {"model", "dataset", "fp_accuracy", "rows"}
    assert on_disk["model"] == "mlp" and on_disk["dataset"] == "fashion-mnist"
    assert len(on_disk["rows"]) == 1 + len(METHODS)
    for row in on_disk["rows"]:
        assert set(row) == {"method", "w_bits", "a_bits", "accuracy", "size_bytes", "seconds"}
        assert isinstance(row["size_bytes"], int) and 0 <= row["accuracy"] <= 100
    fp = on_disk["fp_accuracy"]
    assert fp > 85.0  # the shipped MLP on real test images
    w8 = next(r for r in on_disk["rows"] if r["w_bits"] == 8)
    assert abs(w8["accuracy"] - fp) < 1.0 and w8["size_bytes"] < on_disk["rows"][0]["size_bytes"] / 3.5
    assert (tmp_path / "results.md").read_text().count("|") > 20
    assert (tmp_path / "accuracy_vs_size.png").read_bytes()[:4] == b"\x89PNG"


def _subcommands(p: argparse.ArgumentParser):
    """Every (command path, parser) below ``p``, nested sub-commands included."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                yield name, sp
                for sub_name, sub in _subcommands(sp):
                    yield f"{name} {sub_name}", sub


def test_every_option_of_every_command_has_help():
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, sp in _subcommands(parser())
               for a in sp._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert not missing, f"options without --help text: {missing}"


def test_every_data_reading_command_takes_data_dir():
    for command in ("summary", "ptq", "qat", "mixed", "export", "train"):
        extra = ["--out", "x"] if command == "export" else ["--model", "mlp"] if command == "train" else []
        assert parser().parse_args([command, "--data-dir", "/data", *extra]).data_dir == "/data"


def test_python_dash_m_lowbit_is_the_command_line():
    out = subprocess.run([sys.executable, "-m", "lowbit", "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: lowbit") and "qat" in out and "export" in out


def test_train_writes_a_run_folder_and_never_the_shipped_checkpoint_unasked(tmp_path):
    shipped = checkpoint_path("mlp")
    assert train_output("mlp", "fashion-mnist", None, False) == Path("lowbit-train/mlp-fashion-mnist.safetensors")
    assert train_output("mlp", "fashion-mnist", str(tmp_path / "m.safetensors"), False) == tmp_path / "m.safetensors"
    assert train_output("mlp", "fashion-mnist", None, True) == shipped
    with pytest.raises(LowbitError, match="--into-zoo"):
        train_output("mlp", "fashion-mnist", str(shipped), False)
    with pytest.raises(LowbitError, match="drop --out"):
        train_output("mlp", "fashion-mnist", str(tmp_path / "m.safetensors"), True)


def test_qat_does_not_distil_unless_asked():
    # the QAT rows of docs/RESULTS.md were run without distillation: the default must reproduce them
    assert parser().parse_args(["qat"]).distill is False
    assert parser().parse_args(["qat", "--distill"]).distill is True
    assert parser().parse_args(["qat", "--no-teacher"]).distill is False
