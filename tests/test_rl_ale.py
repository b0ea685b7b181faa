"""The Atari path end to end on a short run: a Nature-DQN teacher on ALE Pong, a distilled W8A8
student, its export played by the integer engine with the student's actions."""

import pytest
import torch

import lowbit
from lowbit.rl.distill import DistillConfig
from lowbit.rl.dqn import DQNConfig
from lowbit.rl.students import distill_student, play_frames
from lowbit.rl.teach import teach
from tests.rl_support import needs_ale

SHORT = {"max_episode_steps": 40}  # agent steps per episode: keeps every episode of the test short


@pytest.mark.slow  # about 45 s of CPU: Nature-DQN forwards on 84x84 frames
@needs_ale
def test_atari_teacher_student_export_and_engine(tmp_path):
    cfg = DQNConfig(game="ale/pong", arch="nature", frames=80, replay_start=60, replay_size=100, batch_size=8,
                    eval_every=10_000, save_every=10_000, clip_rewards=True, env_options=SHORT)
    teacher, meta = teach(cfg, tmp_path / "teacher", test_episodes=2, log=lambda m: None)
    assert meta["obs_shape"] == [4, 84, 84] and meta["num_actions"] == 6 and meta["frames"] >= 80
    assert abs(meta["obs_scale"] - 1 / 255) < 1e-12
    dcfg = DistillConfig(game="ale/pong", frames=40, learn_start=20, batch_size=8, replay_size=50,
                         eval_every=10_000, save_every=10_000, env_options=SHORT)
    student, row = distill_student(dcfg, tmp_path / "teacher" / "teacher.safetensors", "rl-w8a8", tmp_path / "s",
                                   test_episodes=2, log=lambda m: None)
    assert row["frames"] >= 40 and 0.0 <= row["agreement"] <= 1.0
    lowbit.export(student, tmp_path / "export", arch="nature")
    engine = lowbit.deploy.IntegerEngine.from_path(tmp_path / "export")
    frames = play_frames("ale/pong", 12, policy=student, seed=1, env_options=SHORT).float() / 255
    with torch.no_grad():
        assert torch.equal(engine.predict(frames), student(frames).argmax(dim=1))
