"""The two training losses against hand computations (no game needed)."""

import math

import pytest
import torch
from torch import nn

from lowbit.errors import GameError
from lowbit.rl.distill import distillation_kl
from lowbit.rl.dqn import td_loss
from lowbit.rl.policy import linear_epsilon


def test_distillation_kl_matches_a_hand_computation():
    teacher_q = torch.tensor([[1.00, 1.01, 0.97]])
    student = torch.tensor([[0.5, 0.0, -1.0]], requires_grad=True)
    tau = 0.01
    e = [math.exp(q / tau) for q in (1.00, 1.01, 0.97)]
    p_t = [v / sum(e) for v in e]  # (e^0 : e^1 : e^-3) / sum, i.e. 0.2654, 0.7214, 0.0132
    z = [math.exp(v) for v in (0.5, 0.0, -1.0)]
    p_s = [v / sum(z) for v in z]
    expected = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    loss = distillation_kl(student, teacher_q, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()  # d KL / d z_S = p_S - p_T
    assert student.grad[0].tolist() == pytest.approx([ps - pt for ps, pt in zip(p_s, p_t)], abs=1e-6)


def test_distillation_kl_is_zero_when_the_student_matches_and_averages_the_batch():
    q = torch.tensor([[0.3, 0.1], [0.0, 0.2]])
    assert distillation_kl(q / 0.5, q, 0.5).item() == pytest.approx(0.0, abs=1e-7)
    single = [distillation_kl(torch.zeros(1, 2), q[i:i + 1], 0.1) for i in range(2)]
    assert distillation_kl(torch.zeros(2, 2), q, 0.1).item() == pytest.approx(sum(single).item() / 2)
    with pytest.raises(GameError, match="same game"):
        distillation_kl(torch.zeros(1, 3), torch.zeros(1, 4), 0.01)


class Table(nn.Module):
    """Q(s, a) = table[s, a] for one-hot states: a network whose outputs a test can write down."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table))

    def forward(self, x):
        return x.flatten(1) @ self.table


def test_double_dqn_target_and_huber_loss_by_hand():
    online = Table([[1.0, 3.0], [2.0, 0.5]])  # state 1: online prefers action 0
    target = Table([[0.0, 0.0], [10.0, 4.0]])
    batch = {"obs": torch.tensor([[1, 0], [1, 0]], dtype=torch.uint8), "action": torch.tensor([1, 0]),
             "reward": torch.tensor([1.0, 0.5]), "next_obs": torch.tensor([[0, 1], [0, 1]], dtype=torch.uint8),
             "terminal": torch.tensor([False, True])}
    # double: y = r + 0.9 * target[1, argmax online[1]] = 1 + 0.9 * 10 = 10 (row 0); terminal row 1: y = 0.5
    # q = online[0, a] = 3.0, 1.0; errors 7.0 (Huber 6.5) and 0.5 (Huber 0.125); mean 3.3125
    loss = td_loss(online, target, batch, gamma=0.9, double=True)
    assert loss.item() == pytest.approx(3.3125)
    # plain DQN takes max_a target[1, a] = 10 too; make them differ: the online argmax picks action 1
    online.table.data[1] = torch.tensor([0.0, 5.0])
    double = td_loss(online, target, batch, gamma=0.9, double=True)  # y0 = 1 + 0.9 * 4 = 4.6, error 1.6 -> 1.1
    plain = td_loss(online, target, batch, gamma=0.9, double=False)  # y0 = 10, error 7 -> 6.5
    assert double.item() == pytest.approx((1.1 + 0.125) / 2) and plain.item() == pytest.approx((6.5 + 0.125) / 2)


def test_td_loss_gradient_reaches_only_the_online_network():
    online, target = Table([[1.0, 3.0], [2.0, 0.5]]), Table([[0.0, 0.0], [1.0, 1.0]])
    batch = {"obs": torch.tensor([[1, 0]], dtype=torch.uint8), "action": torch.tensor([1]),
             "reward": torch.tensor([0.0]), "next_obs": torch.tensor([[0, 1]], dtype=torch.uint8),
             "terminal": torch.tensor([False])}
    td_loss(online, target, batch, gamma=1.0, double=True).backward()
    assert target.table.grad is None
    assert online.table.grad.tolist() == [[0.0, 1.0], [0.0, 0.0]]  # Huber slope 1 at error 2, only Q(s0, a1)


def test_linear_epsilon():
    assert [linear_epsilon(f, 1.0, 0.1, 100) for f in (0, 50, 100, 1000)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
