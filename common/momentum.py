"""The two mechanisms of momentum methods (MoCo), written once: an exponential moving average of
online networks into their momentum copies, and FIFO queues of past embeddings."""
import torch

from common.dist import print0


@torch.no_grad()
def update_ema(pairs, momentum: float) -> None:
    """theta_m <- momentum theta_m + (1 - momentum) theta for each (momentum copy, online
    module) of `pairs`, parameters only: BatchNorm buffers keep their own statistics (MoCo,
    DenseCL, MSN and MMCR's official code alike)."""
    for slow, fast in pairs:
        for p_m, p in zip(slow.parameters(), fast.parameters()):
            p_m.lerp_(p, 1 - momentum)


@torch.no_grad()
def enqueue(queues: list, rows: list, ptr: torch.Tensor) -> None:
    """FIFO: write rows[i] (N, ...) over the N oldest slots of queues[i] (K, ...), all at the
    pointer `ptr` (a 0-d long buffer, advanced here and kept on the device: no host
    synchronisation per step). K must be a multiple of N, so a batch never straddles the end."""
    n, k = rows[0].shape[0], queues[0].shape[0]
    if k % n:
        raise ValueError(f"queue length {k} is not a multiple of the global batch {n}")
    slots = ptr + torch.arange(n, device=ptr.device)  # (N,)
    for queue, new in zip(queues, rows):
        queue.index_copy_(0, slots, new.to(queue.dtype))
    ptr.add_(n).remainder_(k)


def cap_queue(size: int, limit: int, flag: str, why: str) -> int:
    """`size`, or `limit` (a multiple of the global batch) when `size` is larger, with a notice
    that gives `why`. (A limit of 0, less than one global batch of data, is left to the loader
    to refuse.)"""
    if size <= limit or limit == 0:
        return size
    print0(f"notice: {flag} {size} {why}: using {limit}")
    return limit
