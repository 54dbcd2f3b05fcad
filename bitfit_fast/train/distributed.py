"""One process or many under `torchrun`: the process group, this rank's device, and the few collectives the loop
and evaluation need (each a no-op for one process)."""

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Dist:
    """This process's place: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """The process that writes the run's files and prints."""
        return self.rank == 0


def default_device() -> torch.device:
    """The device of a single process: the GPU where there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPU. Otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Dist(dist.get_rank() if world > 1 else 0, world, device)


def all_reduce_sum(value: float, d: Dist) -> float:
    """The sum of ``value`` over all processes."""
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item()


def broadcast_from_main(params: list[torch.Tensor], d: Dist) -> None:
    """Every process's ``params`` set to the main process's, as DistributedDataParallel sets them when it wraps a
    model: whatever each process initialised, they train the same values."""
    if d.world > 1:
        for p in params:
            dist.broadcast(p.data, 0)


def sum_gradients(params: list[torch.Tensor], d: Dist) -> None:
    """Each gradient of ``params`` replaced by its sum over all processes (a process that computed none adds zeros;
    one that no process computed stays None, as the optimizer skips it in one process): one all-reduce of them
    flattened in a fixed order per dtype, so that an element is added in the same order at every step.
    DistributedDataParallel rebuilds its buckets in the backward's order after the first step: with 3 or more
    processes a resumed run's first step then rounded otherwise than the uninterrupted run's. BitFit's gradients are
    few; one buffer of them costs little."""
    if d.world == 1:
        return
    for dtype in dict.fromkeys(p.dtype for p in params):
        group = [p for p in params if p.dtype == dtype]
        computed = torch.tensor([p.grad is not None for p in group], dtype=dtype, device=group[0].device)
        flat = torch.cat([*((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group),
                          computed])
        dist.all_reduce(flat)
        *sums, computed = flat.split([p.numel() for p in group] + [len(group)])
        for p, summed, anywhere in zip(group, sums, computed.tolist()):
            p.grad = summed.view_as(p) if anywhere else None


def gather(obj, d: Dist) -> list:
    """Every process's ``obj``, in rank order."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    """Wait for every process (no-op for one)."""
    if d.world > 1:
        dist.barrier()


def params_in_sync(model, d: Dist) -> bool:
    """Whether every process holds the same trainable parameters (compared by checksum)."""
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)
    values = gather(checksum, d)
    return all(v == values[0] for v in values)
