"""Low-precision policy distillation (McKinstry et al. 2018) on MinAtar and the Atari 2600.

A float double-DQN teacher (:func:`teach`), students made by ``lowbit.quantize`` and trained by
policy distillation, the direct low-precision DQN they are compared with, and seeded evaluation.
The games come from the optional extra ``lowbit[rl]`` (GPL packages), imported only when a game
is made.
"""

from lowbit.rl.dqn import DQNConfig, DQNRun, td_loss
from lowbit.rl.envs import MINATAR_GAMES, make_env
from lowbit.rl.evaluate import EvalResult, evaluate_policy
from lowbit.rl.replay import Replay
from lowbit.rl.teach import load_teacher, teach

__all__ = ["DQNConfig", "DQNRun", "EvalResult", "MINATAR_GAMES", "Replay", "evaluate_policy", "load_teacher",
           "make_env", "td_loss", "teach"]
