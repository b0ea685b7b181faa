"""torch.distributed for the fine-tuning loop (launch with ``torchrun --nproc_per_node=N``).

Every rank iterates the same global batches (the loaders are seeded, so the order is the
same everywhere) and trains on its own contiguous slice of each, so N processes see
exactly the batches one process would, split N ways. DistributedDataParallel averages the
gradients; the local loss is weighted by ``n_local * N / n_global`` so the average is the
gradient of the global-batch mean even when the slices differ in size.

Quantizer state stays identical on every rank: LSQ steps and PACT clips are ordinary
parameters (DDP all-reduces their gradients and the updates are identical); SAWB and
min-max weight steps are recomputed from weights that are identical; calibration runs on
the same (full) batches on every rank; buffers (batch-norm statistics, quantizer grids) are
broadcast from rank 0 when training starts, when batch norm freezes and at every epoch end.
Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lowbit.errors import DistributedError
from lowbit.qat.state import digest


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False  # this module initialised the process group (and tears it down)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), if any."""
    if not dist.is_available():
        return DistInfo()
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = _env_int("WORLD_SIZE", "1")
    if world <= 1:
        return DistInfo()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise DistributedError(f"WORLD_SIZE is {world} but {', '.join(missing)} is not set; launch with torchrun "
                               "(e.g. torchrun --nproc_per_node=2 ...), which sets them all")
    rank = _env_int("RANK")
    local = _env_int("LOCAL_RANK", os.environ["RANK"])
    local_world = _env_int("LOCAL_WORLD_SIZE", str(world))
    if not 0 <= rank < world or not 0 <= local < local_world or local_world > world:
        raise DistributedError(f"inconsistent torchrun environment: RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK "
                               f"{local}, LOCAL_WORLD_SIZE {local_world}; each rank must be below its world size")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    return DistInfo(rank, world, local, created=True)


def _env_int(name: str, default: str | None = None) -> int:
    value = os.environ.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name}={value!r} is not an integer; launch with torchrun") from None


def check_same_everywhere(run: dict, info: DistInfo) -> None:
    """Raise :class:`~lowbit.errors.DistributedError` on every rank unless all ranks describe the same
    run (settings, model and recipe, data length, step): ranks that disagree would train different
    models and deadlock or silently average unrelated gradients."""
    if not info.enabled:
        return
    mine = digest(run)
    every = [None] * info.world_size
    dist.all_gather_object(every, mine)
    odd = [r for r, d in enumerate(every) if d != every[0]]
    if odd:
        raise DistributedError(f"rank(s) {odd} run with other settings, model, recipe or data than rank 0 (digest "
                               f"{every[0]} vs {[every[r] for r in odd]}); start every rank with the same command")


def teardown(info: DistInfo) -> None:
    if info.created and dist.is_initialized():
        dist.destroy_process_group()


def device_for(info: DistInfo, model: nn.Module) -> torch.device:
    if info.enabled and dist.get_backend() == "nccl":
        return torch.device("cuda", info.local_rank)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    # Buffers are synchronised by broadcast_buffers() (at the start, when batch norm freezes, at
    # epoch ends), not by DDP, whose broadcast fails on dtypes gloo lacks (bool, int16 in quantizers).
    broadcast_buffers(model, info)
    DDP._set_params_and_buffers_to_ignore_for_model(model, [name for name, _ in model.named_buffers()])
    try:
        return DDP(model, device_ids=ids, output_device=device.index if ids else None)
    finally:
        del model._ddp_params_and_buffers_to_ignore  # read once, at construction


def shard(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's contiguous slice of a global batch."""
    if not info.enabled:
        return x
    return torch.tensor_split(x, info.world_size)[info.rank]


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@torch.no_grad()
def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Make every rank's buffers (batch-norm statistics, quantizer grids) rank 0's.

    All buffers travel in one float64 vector (exact for every float and for integers below
    2^53), since gloo cannot broadcast some of their dtypes (bool, int16).
    """
    if not info.enabled:
        return
    buffers = [b for b in model.buffers() if b.numel() > 0]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in buffers])
    dist.broadcast(flat, 0)
    offset = 0
    for b in buffers:
        n = b.numel()
        b.copy_(flat[offset:offset + n].view(b.shape).to(b.dtype))
        offset += n


def gradient_sync(net: nn.Module, sync: bool):
    """A context in which backward all-reduces gradients only if ``sync`` (the last micro-batch of a
    step under gradient accumulation); a no-op for a model that is not wrapped."""
    if sync or not hasattr(net, "no_sync"):
        return contextlib.nullcontext()
    return net.no_sync()
