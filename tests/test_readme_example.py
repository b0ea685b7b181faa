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


def test_readme_language_model_example_runs(capsys):
    from lowbit.zoo.language import bytellama_path

    pytest.importorskip("transformers")
    if not bytellama_path().is_file():
        pytest.skip("bytellama checkpoint not shipped")
    blocks = [b for b in readme_python_blocks() if "silq-w4a8kv8" in b]
    assert blocks, "README has no language-model example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    qmodel = namespace["qmodel"]
    assert "'perplexity'" in out and "'kl'" in out and "'agreement'" in out
    block = qmodel.model.layers[0].self_attn
    assert block.key_quantizer.bits == 8 and block.q_proj.weight_quantizer.bits == 4
    assert not hasattr(namespace["model"].model.layers[0].self_attn, "key_quantizer")  # the float model untouched
