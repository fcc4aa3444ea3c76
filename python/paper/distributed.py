"""Data-parallel training runs: the processes of one run (ranks) and what they share.

A run started by `torchrun --nproc_per_node=K python/train.py ...` (or with the environment torchrun
sets: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) trains on K ranks: gloo on CPU, NCCL on CUDA (one
GPU per rank, cuda:LOCAL_RANK). Every rank reads the same global batches (the same order, a function
of seed and epoch) and trains on its contiguous slice of each; the model is wrapped in
dwf_kernels.parallel.DistributedDataParallel, which averages the gradients. A rank's loss is its
slice's summed loss scaled to the global batch, so the average over ranks is the global batch's
mean loss even where the last batch of an epoch does not split evenly: the run equals one process
with the same --batch-size, to rounding (BatchNorm layers use each rank's statistics, as in torch's
DDP). Evaluation is split over the ranks too. Rank 0 alone prints, writes results.json, checkpoints
and the compressed model.

Every collective waits at most `timeout` seconds: a rank that dies (or hangs) makes the others stop
with an error instead of waiting for ever.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class RankFailure(RuntimeError):
    """Another rank of the run stopped (or stopped answering): this one cannot go on alone."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a global batch of n examples."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of `values` (a tensor on the training device)."""
        if self.world > 1:
            dist.all_reduce(values)
        return values


SINGLE = Ranks()


def launched_world() -> int:
    """How many ranks the launcher (torchrun) asked for; 1 when run as a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(device: torch.device, timeout: float) -> tuple[Ranks, torch.device]:
    """Joins the run's process group when launched on several ranks; returns the ranks and this
    rank's device (cuda:LOCAL_RANK on CUDA)."""
    world = launched_world()
    if world <= 1:
        return SINGLE, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    delta = datetime.timedelta(seconds=timeout)
    store = _restarted_store(world, delta)
    if store is None:
        dist.init_process_group(backend, timeout=delta)
    else:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world, timeout=delta)
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def _restarted_store(world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """The store of workers that torchrun restarted (--max-restarts) while its agent shares its own
    store with them (torch's default): that store under a prefix of this attempt. The shared store
    still holds what the previous attempt's workers wrote under the same keys (each process group's
    name repeats from attempt to attempt): gloo would read the dead workers' addresses and hang
    connecting to them, NCCL their unique id. None otherwise (init_process_group's env:// store)."""
    if not restarted() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"dwf-attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}/", store)


def stop(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def is_collective_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another rank is gone or silent: torch's
    distributed errors, and the plain RuntimeError that gloo and NCCL raise from a collective (or
    from waiting on one: torch.distributed's code or the DWF reducer's, the innermost frame)."""
    if isinstance(exc, dist.DistError) or any(mark in str(exc) for mark in _TRANSPORT_ERRORS):
        return True
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    where = code.co_filename.replace(os.sep, "/")
    if where.endswith("/dwf_kernels/parallel.py"):
        return code.co_name in _REDUCER_COLLECTIVES
    return "/torch/distributed/" in where


# What gloo's and NCCL's errors say (raised as plain RuntimeError, e.g. from torch's reducer, which
# waits in C++ at the end of the backward pass).
_TRANSPORT_ERRORS = ("/gloo/", "NCCL", "ProcessGroup", "pair closure", "Connection reset by peer")
# The DWF reducer's methods that start or wait for collectives (dwf_kernels/parallel.py).
_REDUCER_COLLECTIVES = ("launch", "finish", "shadow", "broadcast_from_first_rank", "post_hook")


def restarted() -> bool:
    """Whether torchrun restarted this run's workers after a failure (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
