"""Every code line of the README runs: its Python blocks and inline calls execute, its command lines
parse with the real CLI parser (the long-running ones are not executed here), its make targets and
benchmark scripts exist."""

import re
import shlex
from pathlib import Path

import pytest
import torch

from lowbit.cli import parser
from lowbit.zoo import checkpoint_path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def blocks(language: str, section: str | None = None) -> list[str]:
    """The fenced blocks of ``language``, in order; with ``section``, only those under that ``## `` heading."""
    text = README if section is None else sections()[section]
    return [body for lang, body in FENCE.findall(text) if lang == language]


def sections() -> dict[str, str]:
    """``{heading: text}`` of the README's ``## `` sections."""
    parts = re.split(r"^## (.+)$", README, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def prose_spans() -> list[str]:
    """Inline code spans outside the fenced blocks."""
    return re.findall(r"`([^`\n]+)`", FENCE.sub("", README))


def command_lines() -> list[str]:
    """Command lines of the sh blocks as written; a command named in the prose (`lowbit qat`) is checked
    with --help (the prose names it, it does not run it)."""
    starts = ("lowbit ", "python -m lowbit", "make ", "python ")
    lines = [ln.split("#")[0].strip() for b in blocks("sh") for ln in b.splitlines()]
    named = [s + " --help" if s.startswith(("lowbit", "python -m lowbit")) else s for s in prose_spans()]
    return [ln for ln in lines + named if ln.startswith(starts)]


def test_every_readme_command_line_parses_or_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    checked = 0
    for line in command_lines():
        words = shlex.split(line)
        if words[0] == "make":
            assert set(words[1:]) <= targets, f"README: `{line}` names a make target the Makefile lacks"
        elif words[:3] == ["python", "-m", "lowbit"] or words[0] == "lowbit":
            args = words[3:] if words[0] == "python" else words[1:]
            try:
                parser().parse_args(args)
            except SystemExit as exc:  # --help exits 0; a bad option exits 2
                assert exc.code == 0, f"README: `{line}` does not parse"
        else:
            assert (ROOT / words[1]).is_file(), f"README: `{line}` runs a script that does not exist"
        checked += 1
    assert checked >= 10


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST not installed")
@pytest.mark.skipif(not checkpoint_path("resnet20").is_file(), reason="resnet20 checkpoint not shipped")
def test_readme_python_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the examples write runs/...
    torch.manual_seed(0)
    namespace: dict = {}
    python = blocks("python", "In Python")
    assert len(python) >= 2
    for i, code in enumerate(python):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
    calls = [s for s in prose_spans() if re.fullmatch(r"lowbit\.[\w.]+\(.*\)", s)]
    for call in calls:  # inline calls in the prose run too, in the same namespace
        eval(call, namespace)
    assert "lowbit.list_recipes()" in calls
    out = capsys.readouterr().out
    qmodel, model, x = namespace["qmodel"], namespace["model"], next(iter(namespace["calib"]))[0][:16]
    assert "layer1.0.conv1" in out and "4b sawb/ch" in out and "8b pact" in out
    assert qmodel.conv1.weight_quantizer.bits == 8 and qmodel.layer2[0].conv1.weight_quantizer.bits == 4
    assert not hasattr(model.conv1, "weight_quantizer")  # the README promises the float model is untouched
    with torch.no_grad():
        reference = qmodel.eval()(x)
        assert torch.equal(namespace["again"].eval()(x), reference)
        assert torch.equal(namespace["deployed"](x), reference)  # batch norm folded at quantization: exact
        assert (namespace["engine"].predict(x) == reference.argmax(1)).sum() >= 15  # integer arithmetic
    assert namespace["plan"].cost <= 0.5 * namespace["plan"].space.bounds()[1]


@pytest.mark.slow
def test_readme_reinforcement_learning_example_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("minatar", reason="minatar is not installed (pip install lowbit[rl])")
    from lowbit.zoo.teachers import teacher_path

    if not teacher_path("breakout").is_file():
        pytest.skip("the breakout teacher is not shipped")
    monkeypatch.chdir(tmp_path)
    (code,) = blocks("python", "Reinforcement learning: low-precision policy distillation")
    exec(compile(code, "README.md (reinforcement learning)", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert "% of the teacher" in lines[-2] and float(lines[-1]) >= 0.0
    assert (tmp_path / "runs" / "breakout-w2a2" / "export" / "manifest.json").is_file()


def test_readme_language_model_example_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    from lowbit.zoo.language import bytellama_path

    if not bytellama_path().is_file():
        pytest.skip("the bytellama checkpoint is not shipped")
    monkeypatch.chdir(tmp_path)  # the example writes runs/...
    torch.manual_seed(0)
    (code,) = blocks("python", "Language models")
    namespace: dict = {}
    exec(compile(code, "README.md (language models)", "exec"), namespace)
    out = capsys.readouterr().out
    assert "'perplexity'" in out and "'kl'" in out and "'agreement'" in out
    block = namespace["qmodel"].model.layers[0].self_attn
    assert block.key_quantizer.bits == 8 and block.q_proj.weight_quantizer.bits == 4
    assert not hasattr(namespace["model"].model.layers[0].self_attn, "key_quantizer")  # the float model untouched
    ids = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        reference = namespace["qmodel"].eval()(ids).logits
        assert torch.equal(namespace["deployed"](ids).logits, reference)  # the export's promise
        assert (namespace["fast"](ids).logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
