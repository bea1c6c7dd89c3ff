"""One process or many under torchrun: rank, world size, barriers. CPU runs use gloo.

`is_main()` is the one answer to "am I rank 0" (only rank 0 writes metrics, checkpoints, markers);
`pick_device` the one answer to "which device does params' `device: auto` mean here".
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator

from pipeline.errors import UserError


def _live_group():
    """torch.distributed when a process group is up, else None (torch is never imported for this)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


def group() -> tuple[int, int]:
    """(rank, world size) of the live process group; (0, 1) without one, so collectives (barriers,
    all-reduce) are skipped when there is nobody to meet."""
    dist = _live_group()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def is_main() -> bool:
    """Whether this process is rank 0: the group's rank while there is a group, else torchrun's RANK
    (set before the group is made and still set after it is closed); a plain run is rank 0."""
    dist = _live_group()
    return (dist.get_rank() if dist else int(os.environ.get("RANK", "0"))) == 0


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather_all(self, obj):
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_ok(self, ok: bool) -> bool:
        """True on every rank only if every rank passes ok=True (so one rank's error stops all)."""
        if self.world == 1:
            return ok
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(flag)
        return int(flag.item()) == 0


_GENERATION: ContextVar["Dist | None"] = ContextVar("xmodel_generation_ranks", default=None)


@contextmanager
def generation_across(d: Dist) -> Iterator[None]:
    """Within the block, pipeline.generation.generate shares its length batches among d's ranks and
    gives every rank all items' results (every rank must make the same calls, on the same items)."""
    token = _GENERATION.set(d if d.world > 1 else None)
    try:
        yield
    finally:
        _GENERATION.reset(token)


def generation_ranks() -> Dist | None:
    """The group generate shares its batches with (generation_across), or None: one process."""
    return _GENERATION.get()


def _comm_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_dist(device: str = "auto") -> Dist:
    """Join the torchrun group if launched by torchrun; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def close_dist(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def pick_device(device: str = "auto") -> Any:
    """auto: cuda, else mps, else cpu. An explicit device must exist."""
    import torch

    mps = torch.backends.mps.is_available()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"device {device!r} is not valid: use auto, cpu, cuda, cuda:N or mps") from None
    missing = (dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count())
               or dev.type == "mps" and not mps)
    if missing:
        raise UserError(f"device {device!r} is not available on this machine: use auto or cpu")
    return dev
