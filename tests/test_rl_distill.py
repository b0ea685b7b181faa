"""Policy distillation end to end on a tiny budget: seeded, resumable, game-checked, and the
exported student playing through the integer engine with the fake-quant student's actions."""

import pytest
import torch

import lowbit
from lowbit.errors import GameError
from lowbit.rl.distill import DistillConfig, DistillRun
from lowbit.rl.dqn import DQNConfig
from lowbit.rl.evaluate import evaluate_policy
from lowbit.rl.students import build_student, dqn_student, load_student, play_frames, student_recipe
from lowbit.rl.teach import teach
from tests.rl_support import needs_minatar

pytestmark = needs_minatar
QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A (barely trained) breakout teacher: distillation only needs its Q-values."""
    run_dir = tmp_path_factory.mktemp("teacher")
    cfg = DQNConfig(game="breakout", frames=300, replay_start=100, replay_size=500, eval_every=10_000,
                    save_every=10_000)
    net, _ = teach(cfg, run_dir, test_episodes=2, **QUIET)
    return net, run_dir / "teacher.safetensors"


def student_for(teacher_net, precision="2", seed=0):
    calib = play_frames("breakout", 64, policy=teacher_net, seed=11)
    return build_student("minatar-small", (4, 10, 10), 6, student_recipe(precision), calib, seed=seed)


def tiny(**kw):
    return DistillConfig(**{**dict(game="breakout", frames=200, learn_start=50, eval_every=10_000, save_every=100,
                                   replay_size=300), **kw})


def test_distillation_is_seeded_and_resumes_exactly(teacher, tmp_path):
    net, _ = teacher
    a = DistillRun(tiny(), tmp_path / "a", teacher=net, student=student_for(net), **QUIET).train()
    b = DistillRun(tiny(), tmp_path / "b", teacher=net, student=student_for(net), **QUIET).train()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    DistillRun(tiny(frames=100), tmp_path / "c", teacher=net, student=student_for(net), **QUIET).train()
    c = DistillRun(tiny(), tmp_path / "c", teacher=net, student=student_for(net), resume=True, **QUIET).train()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_student_acting_option_is_used(teacher, tmp_path):
    net, _ = teacher
    run = DistillRun(tiny(student_acting=1.0, epsilon=0.0), tmp_path, teacher=net, student=student_for(net), **QUIET)
    acted = []
    run.on_episode_start()
    acted.append(run.student_acts)
    assert acted == [True]
    run.train()
    assert run.frame >= 200 and len(run.memory) == min(run.frame, 300)


def test_a_teacher_of_another_game_is_refused(teacher, tmp_path):
    net, path = teacher
    with pytest.raises(GameError, match="cannot read 'seaquest' frames"):
        DistillRun(tiny(game="seaquest"), tmp_path, teacher=net, student=student_for(net), **QUIET)
    from lowbit.rl.students import distill_student
    with pytest.raises(GameError, match="not 'freeway'"):
        distill_student(tiny(game="freeway"), path, "rl-w2a2", tmp_path / "x", **QUIET)


@pytest.mark.parametrize("precision", ["2", "ternary"])
def test_exported_student_plays_with_the_fake_quant_actions(teacher, tmp_path, precision):
    net, _ = teacher
    student = DistillRun(tiny(), tmp_path / "run", teacher=net, student=student_for(net, precision), **QUIET).train()
    lowbit.export(student, tmp_path / "export", arch="minatar-small")
    engine = lowbit.deploy.IntegerEngine.from_path(tmp_path / "export")
    frames = play_frames("breakout", 400, policy=student, epsilon=0.3, seed=5).float()
    with torch.no_grad():
        fake = student(frames)
    assert torch.equal(engine.predict(frames), fake.argmax(dim=1))
    torch.testing.assert_close(engine(frames), fake, atol=1e-4, rtol=1e-4)
    by_engine = evaluate_policy(engine, "breakout", episodes=3, seed=9)
    by_model = evaluate_policy(student, "breakout", episodes=3, seed=9)
    assert by_engine.returns == by_model.returns and by_engine.frames == by_model.frames


def test_students_save_and_load_and_direct_dqn_runs(teacher, tmp_path):
    _, path = teacher
    cfg = DQNConfig(game="breakout", frames=150, replay_start=50, replay_size=200, eval_every=10_000, save_every=10_000,
                    arch="minatar-small")
    student, row = dqn_student(cfg, "rl-ternary-binary", tmp_path, teacher_path=path, test_episodes=2, **QUIET)
    assert row["method"] == "dqn" and row["frames"] >= 150 and 0.0 <= row["agreement"] <= 1.0
    loaded, meta = load_student(tmp_path / "student")
    assert meta["recipe"] == "rl-ternary-binary" and meta["game"] == "breakout"
    frames = play_frames("breakout", 50, seed=3).float()
    with torch.no_grad():
        assert torch.equal(loaded(frames), student(frames))
    assert loaded.fc.weight_quantizer.qmin == -1 and loaded.fc.weight_quantizer.qmax == 1  # ternary
    assert loaded.fc.input_quantizer.qmin == 0 and loaded.fc.input_quantizer.qmax == 1  # binary


def test_nan_teacher_q_values_stop_distillation(teacher, tmp_path):
    import copy

    from lowbit.qat.state import NonFiniteError
    net, _ = teacher
    broken = copy.deepcopy(net)
    with torch.no_grad():
        broken.head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite Q-values"):
        DistillRun(tiny(), tmp_path, teacher=broken, student=student_for(net), **QUIET).train()


def test_resume_with_another_teacher_is_refused(teacher, tmp_path):
    import copy

    from lowbit.errors import CheckpointError
    net, _ = teacher
    DistillRun(tiny(frames=60), tmp_path, teacher=net, student=student_for(net), **QUIET).train()
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.head.bias.add_(1.0)
    with pytest.raises(CheckpointError, match="teacher_sha256"):
        DistillRun(tiny(), tmp_path, teacher=other, student=student_for(net), resume=True, **QUIET)
