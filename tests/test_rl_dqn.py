"""DQN teacher training: seeded, resumable to the bit, refusing a resume with other settings,
stopping on NaN, and the teacher checkpoint it ships."""

import json

import pytest
import torch

from lowbit.errors import CheckpointError, GameError, LowbitError
from lowbit.qat.state import NonFiniteError
from lowbit.rl.dqn import DQNConfig, DQNRun
from lowbit.rl.teach import load_teacher, teach
from tests.rl_support import needs_minatar

pytestmark = needs_minatar


def tiny(**kw) -> DQNConfig:
    settings = dict(game="breakout", frames=400, replay_start=100, replay_size=500, target_update=50,
                    epsilon_frames=200, eval_every=300, eval_episodes=2, save_every=150)
    settings.update(kw)
    return DQNConfig(**settings)


def weights(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole = DQNRun(tiny(), tmp_path / "whole", log=lambda m: None)
    whole.train()
    DQNRun(tiny(frames=200), tmp_path / "split", log=lambda m: None).train()
    resumed = DQNRun(tiny(), tmp_path / "split", resume=True, log=lambda m: None)
    assert 200 <= resumed.frame < 400
    resumed.train()
    assert resumed.frame == whole.frame and resumed.updates == whole.updates
    assert torch.equal(weights(resumed.net), weights(whole.net))
    assert torch.equal(weights(resumed.target), weights(whole.target))
    assert resumed.episode_returns == whole.episode_returns
    rows = json.loads((tmp_path / "whole" / "evals.json").read_text())
    assert [r["frame"] >= 300 for r in rows] == [True] and rows == whole.evals


def test_same_seed_same_network_other_seed_other_network(tmp_path):
    a = DQNRun(tiny(frames=200), tmp_path / "a", log=lambda m: None).train()
    b = DQNRun(tiny(frames=200), tmp_path / "b", log=lambda m: None).train()
    c = DQNRun(tiny(frames=200, seed=1), tmp_path / "c", log=lambda m: None).train()
    assert torch.equal(weights(a), weights(b)) and not torch.equal(weights(a), weights(c))


def test_resume_with_other_settings_or_nothing_to_resume_is_refused(tmp_path):
    DQNRun(tiny(frames=150), tmp_path, log=lambda m: None).train()
    with pytest.raises(CheckpointError, match="lr"):
        DQNRun(tiny(lr=1e-3), tmp_path, resume=True, log=lambda m: None)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        DQNRun(tiny(), tmp_path / "empty", resume=True, log=lambda m: None)


def test_nan_q_values_stop_training_with_a_clear_error(tmp_path):
    run = DQNRun(tiny(replay_start=10), tmp_path, log=lambda m: None)
    with torch.no_grad():
        run.net.head.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError):
        run.train()
    assert not (tmp_path / "last.safetensors").exists()  # nothing non-finite was written


def test_bad_settings_are_refused():
    with pytest.raises(LowbitError, match="batch_size"):
        DQNConfig(batch_size=0)
    with pytest.raises(LowbitError, match="gamma"):
        DQNConfig(gamma=1.5)


def test_teacher_checkpoint_and_its_game_check(tmp_path):
    net, meta = teach(tiny(frames=150), tmp_path, test_episodes=3, command="lowbit rl teach ...", log=lambda m: None)
    side = json.loads((tmp_path / "teacher.json").read_text())
    assert side["game"] == "breakout" and side["frames"] >= 150 and side["test_episodes"] == 3
    assert side["mean_return"] == meta["mean_return"] and side["command"] == "lowbit rl teach ..."
    loaded, _ = load_teacher(tmp_path / "teacher.safetensors", "breakout")
    assert torch.equal(weights(loaded), weights(net))
    with pytest.raises(GameError, match="teacher for 'breakout', not 'asterix'"):
        load_teacher(tmp_path / "teacher.safetensors", "asterix")
    side["arch"] = "minatar-small"  # a sidecar that names another architecture than the weights
    (tmp_path / "teacher.json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_teacher(tmp_path / "teacher.safetensors")
