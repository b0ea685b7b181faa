"""A bounded replay memory: a ring of fixed-shape tensors, sampled uniformly with a seeded generator.

    memory = Replay(100_000, obs=((4, 10, 10), torch.uint8), action=((), torch.int64))
    memory.add(obs=frame, action=3)
    batch = memory.sample(32, generator)     # {"obs": [32, 4, 10, 10], "action": [32]}

Once full, each new row overwrites the oldest. Sampling draws ``batch_size`` indices with
replacement from the rows held (as MinAtar's and Mnih et al.'s DQNs do). :meth:`state` and
:meth:`load_state` carry the rows and the write position through a checkpoint.
"""

from __future__ import annotations

import torch

from lowbit.errors import CheckpointError


class Replay:
    def __init__(self, capacity: int, **fields: tuple[tuple[int, ...], torch.dtype]):
        if capacity < 1:
            raise ValueError(f"replay capacity must be positive, got {capacity}")
        if not fields:
            raise ValueError("a replay memory needs at least one field")
        self.capacity = capacity
        self.data = {name: torch.zeros((capacity, *shape), dtype=dtype) for name, (shape, dtype) in fields.items()}
        self.size = 0  # rows held
        self.next = 0  # row the next add writes

    def __len__(self) -> int:
        return self.size

    def add(self, **row) -> None:
        if row.keys() != self.data.keys():
            raise ValueError(f"a replay row needs exactly the fields {sorted(self.data)}, got {sorted(row)}")
        for name, value in row.items():
            self.data[name][self.next] = torch.as_tensor(value)
        self.next = (self.next + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay memory")
        index = torch.randint(self.size, (batch_size,), generator=generator)
        return {name: t[index] for name, t in self.data.items()}

    def state(self, prefix: str = "replay.") -> dict[str, torch.Tensor]:
        """The rows held, as tensors named ``prefix + field``, plus the write position."""
        out = {prefix + name: t[:self.size].clone() for name, t in self.data.items()}
        out[prefix + "next"] = torch.tensor(self.next)
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], prefix: str = "replay.") -> None:
        for name, t in self.data.items():
            rows = tensors.get(prefix + name)
            if rows is None or rows.shape[1:] != t.shape[1:] or rows.dtype != t.dtype or len(rows) > self.capacity:
                raise CheckpointError(f"the checkpoint's replay field {name!r} does not fit this memory "
                                      f"({None if rows is None else tuple(rows.shape)} vs {tuple(t.shape)})")
            t[:len(rows)] = rows
            self.size = len(rows)
        self.next = int(tensors[prefix + "next"])
