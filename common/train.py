"""The step's utilities: the learning-rate schedule, autocast, and backward with the optimizer
step."""
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
