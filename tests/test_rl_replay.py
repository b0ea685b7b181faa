"""The bounded replay memory: ring order, seeded uniform sampling, checkpoint round trip."""

import pytest
import torch

from lowbit.errors import CheckpointError
from lowbit.rl.replay import Replay


def filled(capacity: int, rows: int) -> Replay:
    memory = Replay(capacity, obs=((2,), torch.uint8), value=((), torch.float32))
    for i in range(rows):
        memory.add(obs=torch.tensor([i, i + 1], dtype=torch.uint8), value=float(i))
    return memory


def test_ring_overwrites_the_oldest_rows():
    memory = filled(4, 6)
    assert len(memory) == 4 and memory.next == 2
    assert memory.data["value"].tolist() == [4.0, 5.0, 2.0, 3.0]  # rows 0 and 1 were overwritten by 4 and 5


def test_sampling_draws_only_held_rows_and_is_seeded():
    memory = filled(10, 3)
    a = memory.sample(200, torch.Generator().manual_seed(7))
    b = memory.sample(200, torch.Generator().manual_seed(7))
    assert torch.equal(a["value"], b["value"]) and torch.equal(a["obs"], b["obs"])
    assert set(a["value"].tolist()) == {0.0, 1.0, 2.0}  # never an empty row (value 0 is row 0 here)
    assert torch.equal(a["obs"][:, 0].float(), a["value"])  # fields of a sample stay paired
    counts = torch.bincount(memory.sample(3000, torch.Generator().manual_seed(1))["value"].long())
    assert counts.min() > 900  # uniform: each of 3 rows about 1000 times


def test_state_round_trip_continues_identically():
    memory = filled(5, 7)
    copy = Replay(5, obs=((2,), torch.uint8), value=((), torch.float32))
    copy.load_state(memory.state())
    for m in (memory, copy):
        m.add(obs=torch.tensor([9, 9], dtype=torch.uint8), value=9.0)
    assert torch.equal(memory.data["value"], copy.data["value"]) and copy.next == memory.next


def test_bad_rows_and_states_are_refused():
    memory = filled(3, 1)
    with pytest.raises(ValueError, match="exactly the fields"):
        memory.add(obs=torch.zeros(2, dtype=torch.uint8))
    other = Replay(3, obs=((3,), torch.uint8), value=((), torch.float32))
    with pytest.raises(CheckpointError, match="does not fit"):
        other.load_state(memory.state())
    with pytest.raises(ValueError, match="empty"):
        Replay(2, x=((), torch.int64)).sample(1, torch.Generator())
