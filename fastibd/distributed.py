"""torchrun integration: one process per device, DDP, metric reduction. Without torchrun's
environment everything here is a no-op and the run is a single process. Under torchrun the
run is distributed even with one process (`--nproc_per_node=1` checks DDP and NCCL on one
GPU)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from fastibd.device import Runtime
from fastibd.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    distributed: bool = False  # joined a process group (started by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join(runtime: Runtime) -> tuple[Runtime, World]:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU), if any, and bind
    this process to its GPU: the runtime comes back on cuda:LOCAL_RANK (cuda:0 alone)."""
    world, cuda = World(), runtime.device.type == "cuda"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")),
                      int(os.environ["WORLD_SIZE"]), distributed=True)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(world.local_rank)
        if world.is_main:
            print(f"distributed: {world.size} process{'es' * (world.size > 1)}, backend "
                  f"{dist.get_backend()}", flush=True)
    if cuda:
        runtime = replace(runtime, device=torch.device("cuda", world.local_rank))
    return runtime, world


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Sum a tensor over ranks (identity in a single process)."""
    if world.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def agreed_signal(signum: int | None, world: World, device: torch.device) -> int | None:
    """The stop signal any rank received (the largest number), the same on every rank: all
    ranks stop after the same step, or none does."""
    if not world.distributed:
        return signum
    flag = torch.tensor([signum or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def gather_objects(value, world: World) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank ([value] in one process)."""
    if not world.distributed:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def process_count(nproc: str, device: str, lr_scaling: bool = True) -> int:
    """How many processes to start here: 1 under torchrun (it already did), else `nproc`
    (training.nproc), where auto is one per visible GPU for a recipe whose lr follows the
    global batch (optim.lr_scaling), else 1 (and 1 on a CPU or with device cpu).

    Why not every GPU for the others: data.batch_size is per process, so N processes train
    at N times the batch with the lr tuned for one (the CIFAR recipes' upstream codes keep
    batch 128 on any number of GPUs, with nn.DataParallel)."""
    if "WORLD_SIZE" in os.environ:
        return 1
    nproc = str(nproc).strip()
    if nproc == "auto":
        uses_cuda = device != "cpu" and torch.cuda.is_available()
        gpus = torch.cuda.device_count() if uses_cuda else 1
        if gpus > 1 and not lr_scaling:
            print(f"note: {gpus} GPUs, but this recipe's lr is for one process's batch "
                  "(optim.lr_scaling=false): training in one process; training.nproc=N runs "
                  "N at N times the batch", file=sys.stderr, flush=True)
            return 1
        return gpus
    if not nproc.isdigit() or int(nproc) < 1:
        raise UserError(f"training.nproc: expected auto or a number >= 1, got {nproc!r}")
    return int(nproc)


def relaunch(argv: list[str], nproc: int) -> None:
    """Become `torchrun --standalone --nproc_per_node=N -m fastibd.train ARGV`: torchrun
    starts one process per GPU and forwards Ctrl-C/SIGTERM to them, so each saves its state."""
    print(f"starting {nproc} processes (DDP); set training.nproc=1 for one", flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={nproc}", "-m", "fastibd.train", *argv])
