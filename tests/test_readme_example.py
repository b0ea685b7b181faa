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
