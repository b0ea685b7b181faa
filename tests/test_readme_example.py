"""The README's Python example runs exactly as written."""

import re
from pathlib import Path

import pytest

from lowbit.zoo import checkpoint_path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST not installed")
@pytest.mark.skipif(not checkpoint_path("resnet20").is_file(), reason="resnet20 checkpoint not shipped")
def test_readme_example_runs(capsys):
    blocks = readme_python_blocks()
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    qmodel, model = namespace["qmodel"], namespace["model"]
    assert "layer1.0.conv1" in out and "4b sawb/ch" in out and "8b pact" in out
    assert qmodel.conv1.weight_quantizer.bits == 8 and qmodel.layer2[0].conv1.weight_quantizer.bits == 4
    assert not hasattr(model.conv1, "weight_quantizer")  # the README promises the float model is untouched


def readme_rl_block() -> str:
    return next(b for b in readme_python_blocks() if "from lowbit import rl" in b)


def test_readme_rl_example_runs(tmp_path, monkeypatch, capsys):
    """The RL example as written, on a short budget: only its frame count is lowered."""
    pytest.importorskip("minatar", reason="minatar is not installed (pip install lowbit[rl])")
    from lowbit.zoo.teachers import teacher_path
    if not teacher_path("breakout").is_file():
        pytest.skip("the breakout teacher is not shipped yet")
    code = readme_rl_block()
    assert "frames=50_000" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("frames=50_000", "frames=300, learn_start=100"), "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert "% of the teacher" in lines[-2] and float(lines[-1]) >= 0.0
    assert (tmp_path / "runs" / "breakout-w2a2" / "export" / "manifest.json").is_file()
