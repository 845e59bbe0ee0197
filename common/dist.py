"""torchrun-only distributed helpers: setup, rank-0 printing, and the collectives named for
what they do to gradients (gather: none; gather_with_grad, all_reduce_mean: carried).

Distributed mode is on exactly when torchrun set RANK. A plain `python` run is world size 1
with no process group, and every collective below is then the identity.
"""
import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from common.errors import UserError


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool


def setup(device: str = "auto", timeout_minutes: float = 10) -> Dist:
    """Read torchrun's environment, pick the device and start the process group (NCCL/gloo).
    A collective that waits longer than `timeout_minutes` for a rank raises instead of hanging;
    a rank that dies makes its peers' next collective fail at once (gloo) or at the timeout."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, torch.device(device), True)
    if "LOCAL_RANK" not in os.environ:
        raise UserError("RANK is set but LOCAL_RANK is not: start distributed runs with torchrun "
                        "(or set LOCAL_RANK, the process's GPU on its machine, yourself)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)  # before init_process_group, as the torchrun tutorial
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            timeout=timedelta(minutes=timeout_minutes))
    return Dist(rank, local_rank, dist.get_world_size(), dev, rank == 0)


def launched_world_size() -> int:
    """The world size torchrun launched (1 for a plain `python` run), known before setup()."""
    return int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (torchrun's RANK before setup())."""
    if (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))) == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0, concatenated in rank order. *No gradient* flows back through it:
    use it for queue keys and support sets, never inside a loss that must train the gathered
    part."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 when ranks hold different numbers of rows (e.g. the shards of an
    evaluation split): padded to the largest, gathered, concatenated in rank order."""
    if world_size() == 1:
        return x
    counts = gather(torch.tensor([x.shape[0]], device=x.device)).tolist()
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[:x.shape[0]] = x
    return torch.cat([rows[:n] for rows, n in zip(gather(padded).split(max(counts)), counts)])


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s x on every rank (in place), no gradient; e.g. one shared random permutation."""
    if world_size() > 1:
        dist.broadcast(x, src)
    return x


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient and returns this rank's slice.

    Every rank computes the same global loss L, so after the sum rank r holds W * dL/dx_r;
    DDP then averages parameter gradients over W ranks, giving exactly dL/dtheta of the global
    batch: the gradient scale does not depend on the world size."""

    @staticmethod
    def forward(ctx, x):
        return gather(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 with gradient (equal shapes on every rank; loaders drop_last)."""
    return x if world_size() == 1 else _GatherWithGrad.apply(x)


class _AllReduceMean(torch.autograd.Function):
    """Mean over ranks; backward is the identity, which with DDP's averaging yields the gradient
    of the global mean (the same argument as for gather_with_grad). MSN's AllReduce."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone() / dist.get_world_size()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of x over ranks, differentiable; also used for logged scalars."""
    return x if world_size() == 1 else _AllReduceMean.apply(x)


def prepare_model(model: torch.nn.Module, d: Dist, sync_bn: bool = True) -> torch.nn.Module:
    """SyncBN + DDP when distributed. SyncBN only exists on CUDA: on CPU it is skipped.
    Methods with their own BN scheme (DenseCL's shuffle-BN) pass sync_bn=False.
    Buffers are broadcast from rank 0 once, here; DDP does not re-send them before each
    forward: queues and support sets stay equal on every rank by construction (gathered keys),
    and BN running statistics are not used in training (batch statistics are); rank 0's, the
    ones saved and evaluated, are its own either way. This saves re-sending e.g. NNCLR's 64 MB
    support set every step."""
    if d.world_size == 1:
        return model
    if sync_bn and d.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        print0("BatchNorm: SyncBatchNorm across", d.world_size, "processes")
    elif sync_bn:
        print0("BatchNorm: per-process (SyncBatchNorm needs CUDA; skipped on CPU)")
    for buf in model.buffers():
        broadcast(buf)
    ddp = torch.nn.parallel.DistributedDataParallel
    no_resync = "forward_sync_buffers" if "forward_sync_buffers" in \
        inspect.signature(ddp).parameters else "broadcast_buffers"  # the name of torch < 2.14
    ids = [d.local_rank] if d.device.type == "cuda" else None
    return ddp(model, device_ids=ids, **{no_resync: False})
