"""Several processes, one run: PyTorch's own DistributedDataParallel and FSDP2, NCCL or gloo.

A process started by the elastic launcher (`dpo-train --nproc N`, torchrun) finds WORLD_SIZE, RANK
and LOCAL_RANK in its environment. With one process every helper here is a cheap no-op, so the
trainer has one code path.

How the work is split: every optimizer step's global batch of `batch_size` rows is dealt out
round-robin to the ranks; each rank's loss is normalised by the *global* row weight and scaled by the
world size, so after DDP/FSDP average the gradients, the update equals the one-process update.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init(device_hint: str | None) -> Dist:
    """Join the process group the launcher set up, if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device_hint or "cuda").startswith("cuda")
    if not dist.is_initialized():
        # A rank that dies leaves the others waiting in a collective: time out instead of hanging forever.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return Dist(world, rank, local_rank)


def device(d: Dist, requested: str | None) -> torch.device:
    if d.enabled and torch.cuda.is_available() and (requested or "cuda").startswith("cuda"):
        return torch.device("cuda", d.local_rank)
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(rows: list, d: Dist) -> list:
    """This rank's share of a step's rows (round-robin, so shares differ by at most one)."""
    return rows[d.rank :: d.world] if d.enabled else rows


def all_sum(value: float, d: Dist) -> float:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def all_sums(values: list[float], d: Dist) -> list[float]:
    """Several sums over ranks in one all-reduce."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_max(value: int, d: Dist) -> int:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_true(flag: bool, d: Dist) -> bool:
    """True on every rank if any rank says True (a stop request seen by rank 0 reaches all)."""
    return all_max(int(flag), d) > 0


def gather_objects(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_sum_tensor(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t)
    return t


def wrap(module: torch.nn.Module, mode: str | None, d: Dist, dev: torch.device) -> torch.nn.Module:
    """DDP or FSDP2 around the policy's LogProbModel; unchanged with one process."""
    if not d.enabled or mode is None:
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [dev.index] if dev.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    return shard_fsdp(module)


def shard_fsdp(module: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: each transformer block its own unit, the rest (embeddings, norm, head) in the root."""
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(module):
        fully_shard(block)
    fully_shard(module)
    return module


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder layers: the largest ModuleList in the model."""
    lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


@contextlib.contextmanager
def no_sync(wrapped: torch.nn.Module, mode: str | None, d: Dist, skip: bool):
    """Skip the gradient all-reduce for all but the last micro-batch of a step."""
    if not (d.enabled and skip):
        yield
        return
    if mode == "ddp":
        with wrapped.no_sync():
            yield
        return
    wrapped.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def full_model_state(module: torch.nn.Module, mode: str | None, d: Dist) -> dict | None:
    """Full (unsharded) state dict of `module` on rank 0, None elsewhere; a collective under FSDP."""
    if mode != "fsdp" or not d.enabled:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if d.main else None


def optimizer_state(module: torch.nn.Module, optimizer) -> dict:
    """Optimizer state keyed by parameter name and unsharded: loads into any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module: torch.nn.Module, optimizer, state: dict, d: Dist) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
