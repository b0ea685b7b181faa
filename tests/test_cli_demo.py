"""The command line and the demo, on the shipped MLP (fast) with real Fashion-MNIST."""

import json
from pathlib import Path

import pytest

from lowbit.cli import main
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
