"""The step's utilities: the learning-rate schedule, autocast, backward with the optimizer step,
the EMA of momentum networks and FIFO queues of past embeddings (MoCo's two mechanisms), each
a few launches per step whatever the batch or the number of parameters."""
import contextlib
import math

import torch


def warmup_cosine(step: int, total: int, warmup: int, peak: float, final: float = 0.0) -> float:
    """Linear warmup from 0 to `peak` over `warmup` steps, then cosine from `peak` to `final`
    at step `total`. A pure function of the step, so resuming needs only the step count."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))


def autocast(precision: str, device: torch.device):
    """Autocast context for the networks; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def backward_step(loss, optimizer, scaler=None, clip_params=None, max_norm=math.inf):
    """zero_grad, backward (loss-scaled for fp16), optional grad-norm clipping of `clip_params`
    on the unscaled gradients, then the optimizer step. Returns the clipped norm (or None)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    norm = None if clip_params is None else torch.nn.utils.clip_grad_norm_(clip_params, max_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return norm


@torch.no_grad()
def update_ema(pairs, ema: float) -> None:
    """theta_m <- ema theta_m + (1 - ema) theta for each (momentum copy, online module) of
    `pairs`, parameters only: BatchNorm buffers keep their own statistics (MoCo, DenseCL, MSN
    and MMCR's official code alike). One fused lerp over all parameters."""
    slow = [p for momentum_copy, _ in pairs for p in momentum_copy.parameters()]
    fast = [p for _, online in pairs for p in online.parameters()]
    torch._foreach_lerp_(slow, fast, 1 - ema)


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
