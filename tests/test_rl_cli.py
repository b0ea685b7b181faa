"""``lowbit rl teach | distill | eval | play`` on a tiny budget, and their bad-input errors."""

import json

import pytest

from lowbit.cli import main
from tests.rl_support import needs_minatar

pytestmark = needs_minatar


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl-cli")
    assert main(["rl", "teach", "--game", "breakout", "--frames", "120", "--test-episodes", "3",
                 "--out", str(root / "t")]) == 0
    assert main(["rl", "distill", "--game", "breakout", "--bits", "ternary", "--frames", "120",
                 "--teacher", str(root / "t" / "teacher.safetensors"), "--test-episodes", "3",
                 "--out", str(root / "d")]) == 0
    return root


def test_teach_and_distill_write_their_files(trained, capsys):
    side = json.loads((trained / "t" / "teacher.json").read_text())
    assert side["game"] == "breakout" and side["command"].startswith("lowbit rl teach --game breakout")
    result = json.loads((trained / "d" / "result.json").read_text())
    assert result["recipe"] == "rl-ternary-binary" and result["test_episodes"] == 3
    assert (trained / "d" / "student" / "model.safetensors").is_file()
    assert (trained / "d" / "export" / "manifest.json").is_file()


def test_eval_through_the_engine_and_play_a_gif(trained, capsys):
    from PIL import Image

    assert main(["rl", "eval", "--game", "breakout", "--export", str(trained / "d" / "export"), "--episodes", "4",
                 "--against", str(trained / "t" / "teacher.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "over 4 episodes" in out and "agreement with" in out and "decisions per second of CPU time" in out
    gif = trained / "play.gif"
    assert main(["rl", "play", "--game", "breakout", "--student", str(trained / "d" / "student"), "--gif", str(gif),
                 "--max-steps", "30"]) == 0
    steps = int(capsys.readouterr().out.split(" steps")[0].rsplit(" ", 1)[1])
    with Image.open(gif) as image:
        assert image.n_frames == steps + 1 and image.size == (160, 160)


@pytest.mark.parametrize("argv, message", [
    (["rl", "eval", "--game", "pong"], "unknown game 'pong'"),
    (["rl", "distill", "--game", "breakout", "--bits", "2", "--recipe", "rl-w2a2"], "--bits or --recipe"),
    (["rl", "play", "--game", "breakout", "--teacher", "x.safetensors", "--student", "y"], "pass one of"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_teacher_of_another_game_is_refused(trained, capsys):
    assert main(["rl", "distill", "--game", "asterix", "--teacher", str(trained / "t" / "teacher.safetensors"),
                 "--frames", "50", "--out", str(trained / "x")]) == 2
    assert "teacher for 'breakout', not 'asterix'" in capsys.readouterr().err
