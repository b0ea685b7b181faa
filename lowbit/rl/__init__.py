"""Low-precision policy distillation (McKinstry et al. 2018) on MinAtar and the Atari 2600.

    from lowbit import rl
    teacher, meta = rl.teach(rl.DQNConfig(game="breakout", frames=1_000_000), "runs/teacher")
    student, row = rl.distill_student(rl.DistillConfig(game="breakout"), "runs/teacher/teacher.safetensors",
                                      "rl-w2a2", "runs/w2a2")
    rl.evaluate_policy(student, "breakout", episodes=100, teacher=teacher)

A float double-DQN teacher (:func:`teach`), students made by ``lowbit.quantize`` and trained by
policy distillation (:func:`distill_student`) or, for the comparison, directly by DQN
(:func:`dqn_student`), seeded evaluation, GIFs. The games come from the optional extra
``lowbit[rl]`` (GPL packages), imported only when a game is made.
"""

from lowbit.rl.distill import DistillConfig, DistillRun, distillation_kl
from lowbit.rl.dqn import DQNConfig, DQNRun, td_loss
from lowbit.rl.envs import MINATAR_GAMES, make_env
from lowbit.rl.evaluate import EvalResult, evaluate_policy, frames_per_second
from lowbit.rl.gif import record_episode, write_gif
from lowbit.rl.replay import Replay
from lowbit.rl.students import PRECISIONS, distill_student, dqn_student, load_student, student_recipe
from lowbit.rl.teach import load_teacher, teach

__all__ = ["DQNConfig", "DQNRun", "DistillConfig", "DistillRun", "EvalResult", "MINATAR_GAMES", "PRECISIONS",
           "Replay", "distill_student", "distillation_kl", "dqn_student", "evaluate_policy", "frames_per_second",
           "load_student", "load_teacher", "make_env", "record_episode", "student_recipe", "td_loss", "teach",
           "write_gif"]
