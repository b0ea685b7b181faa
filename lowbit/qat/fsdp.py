"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the fine-tuning loop (``qat: {distributed: fsdp}``).

The loop trains a *replica* of the quantized model: each block a Hugging Face model names in
``_no_split_modules`` (its decoder layers) and then the root are sharded, so every rank holds a
slice of each weight, gradient and optimizer state, and gathers a block's weights only while it
runs. The caller's model stays a plain module; the loop copies the gathered weights back into it
before each checkpoint, evaluation and at the end, so ``finetune`` still trains ``qmodel`` in
place and checkpoints are the same files a single process writes (resume works across the two).
The price is one unsharded copy of the weights per rank beside the shards (the optimizer state,
twice the weights for AdamW, stays sharded): lowbit's choice for an API that hands back an
ordinary module.

FSDP and distributed checkpointing take about a second to import and serve only runs under
``torchrun``: their imports sit in the functions that use them (marked 'deferred: slow').

Quantizer parameters (LSQ steps, PACT clips; some are 0-dim, which ``fully_shard`` refuses) are
left out of sharding, replicated on every rank; after each backward their gradients are averaged
over the ranks in one all-reduce, as DDP would. Buffers (quantizer grids) are broadcast from rank 0
before sharding, with the parameters, so every rank starts from rank 0's model.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from lowbit.qat.distributed import broadcast_buffers
from lowbit.qat.optim import quantizer_parameters


def _replicated(model: nn.Module) -> list[nn.Parameter]:
    return [p for *_, p in quantizer_parameters(model)]  # a list: every rank iterates it in the same order


@torch.no_grad()
def _broadcast_parameters(model: nn.Module) -> None:
    params = [p for p in model.parameters() if p.numel()]
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    dist.broadcast(flat, 0)
    offset = 0
    for p in params:
        p.copy_(flat[offset:offset + p.numel()].view(p.shape).to(p.dtype))
        offset += p.numel()


def shard(model: nn.Module, info, device: torch.device) -> nn.Module:
    """The sharded training replica of ``model`` (module docstring); ``info``: the DistInfo of this run."""
    from torch.distributed.fsdp import fully_shard  # deferred: slow

    replica = copy.deepcopy(model).to(device)
    _broadcast_parameters(replica)
    broadcast_buffers(replica, info)
    ignored = set(_replicated(replica))
    blocks = set(getattr(replica, "_no_split_modules", None) or ())
    for m in replica.modules():
        if type(m).__name__ in blocks:
            fully_shard(m, ignored_params=ignored)
    fully_shard(replica, ignored_params=ignored)
    return replica


def is_sharded(net: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in net.parameters())


def average_replicated_grads(replica: nn.Module, world_size: int) -> None:
    """All-reduce (mean) the gradients of the parameters left out of sharding."""
    params = _replicated(replica)
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """``nn.utils.clip_grad_norm_`` over sharded (DTensor) and replicated gradients together."""
    params = [p for p in params if p.grad is not None]
    sharded = [p for p in params if type(p.grad).__name__ == "DTensor"]
    plain = [p for p in params if type(p.grad).__name__ != "DTensor"]
    norms = []
    if sharded:
        norms.append(nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor())
    if plain:
        norms.append(nn.utils.get_total_norm([p.grad for p in plain]))
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in (sharded, plain):
        if group:
            nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def pull(replica: nn.Module, model: nn.Module) -> None:
    """Copy the replica's gathered weights and buffers into the plain ``model`` (every rank; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # deferred: slow

    state = get_model_state_dict(replica, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    model.load_state_dict({k: v.to(model.state_dict()[k].device) for k, v in state.items()})


def optimizer_state(replica: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer's gathered state keyed by parameter index, as a single process's
    ``optimizer.state_dict()`` is (the replica's parameters are in the plain model's order), on rank 0
    (None on the others). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # deferred: slow

    full = get_optimizer_state_dict(replica, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
    if not full:
        return None
    index = {name: i for i, name in enumerate(n for g in full["param_groups"] for n in g["params"])}
    return {"state": {index[k]: v for k, v in full["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]}


def load_optimizer_state(replica: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an index-keyed state (a checkpoint's) into the sharded optimizer. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict  # deferred: slow

    name_of = {id(p): name for name, p in replica.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    full = {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(replica, optimizer, optim_state_dict=full,
                             options=StateDictOptions(full_state_dict=True))
