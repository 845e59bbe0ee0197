"""LARS: SGD with momentum and layer-wise adaptive rate scaling (You et al., arXiv 1708.03888),
in the two forms the reference code of these methods uses."""
import torch


class LARS(torch.optim.Optimizer):
    """Momentum SGD in which each weight matrix (ndim > 1) steps with a trust ratio; 1-D
    parameters (biases, norm weights) step with the plain gradient: no weight decay, no scaling.
    Either way v = momentum v + d, w = w - lr v.

    clip=True, solo-learn's form (solo/utils/lars.py, clip_lr and exclude_bias_n_norm on), used
    by NNCLR: d = (g + wd w) min(1, eta ||w|| / (||g|| + wd ||w|| + eps) / lr).
    clip=False, Barlow Twins' form, used by the official MMCR ImageNet code
    (mmcr/imagenet/misc.py): d = (g + wd w) eta ||w|| / ||g + wd w||.
    A zero ||w|| or zero gradient norm leaves d unscaled (solo-learn: d = g)."""

    def __init__(self, params, lr: float, weight_decay: float, eta: float = 0.02,
                 momentum: float = 0.9, clip: bool = True, eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, eta=eta,
                                      momentum=momentum, clip=clip, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd, eta = group["lr"], group["weight_decay"], group["eta"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                d = w.grad
                if w.ndim > 1:
                    decayed = d + wd * w
                    w_norm, g_norm = w.norm(), d.norm()
                    if group["clip"]:
                        trust = eta * w_norm / (g_norm + wd * w_norm + group["eps"])
                        trust, fallback = torch.clamp(trust / lr, max=1.0), d
                    else:
                        g_norm = decayed.norm()
                        trust, fallback = eta * w_norm / g_norm, decayed
                    d = torch.where((w_norm > 0) & (g_norm > 0), decayed * trust, fallback)
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                buf = state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                w.add_(buf, alpha=-lr)
