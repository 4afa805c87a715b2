"""Calibration across processes, on torch.distributed (`torchrun`, or `compress run --nproc N`).

Each process holds every weight and a share of the calibration windows (windows rank, rank + N, ...), runs
the decoder layers on its share, and sums its statistics (Hessians, input norms, token counts) with the other
processes' before a pass decides. The linears of a layer are then dealt out: each process compresses its share
and sends the result to the others (engine.receive_linear), so they all go on with the same layer; process 0
writes the checkpoint. The backend is gloo on CPUs and NCCL where CUDA is available. The sums add the same
numbers in another order than one process does, so results equal a single process's to float rounding, not
bit for bit (a GPTQ rounding at a near-tie can go the other way).
"""

import os

import torch
import torch.distributed as dist


def start() -> None:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1); else nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_size()[0] == 0


def share(windows: torch.Tensor) -> torch.Tensor:
    """This process's calibration windows [n, L]: every size-th one from its rank on."""
    rank, size = rank_and_size()
    return windows[rank::size]


def summed(t: torch.Tensor) -> torch.Tensor:
    """t added up over the processes (t itself in one process)."""
    if rank_and_size()[1] == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(value, source: int):
    """`value` as process `source` has it, in every process (a picklable object such as a record)."""
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def broadcast_into(t: torch.Tensor, source: int) -> None:
    """Overwrite t, in every process, with process `source`'s t (the same shape and dtype everywhere)."""
    dist.broadcast(t, src=source)


def barrier() -> None:
    if rank_and_size()[1] > 1:
        dist.barrier()
