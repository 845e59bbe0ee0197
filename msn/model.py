"""MSN: Masked Siamese Networks (Assran et al., arXiv 2204.07141).

Shapes: B = images per process, F = focal views, V = 1 + F anchor views per image,
C, H, W = image channels and size, L = patch tokens of one view, E = ViT width,
D = projection dim, K = prototypes, N = B x world size (the global batch).
"""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import VisionTransformer

from common.dist import all_reduce_mean, world_size
from common.train import update_ema

# (width E, depth, heads) of deit_tiny / deit_small / deit_base (msn src/deit.py); MLP 4 x E
ARCHS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def vit_config(arch: str, patch_size: int, image_size: int, depth: int | None = None) -> dict:
    """Keyword arguments of torchvision.models.VisionTransformer for `arch` (depth: override)."""
    width, arch_depth, heads = ARCHS[arch]
    return dict(image_size=image_size, patch_size=patch_size, num_layers=depth or arch_depth,
                num_heads=heads, hidden_dim=width, mlp_dim=4 * width)


def resize_pos_embedding(pos: torch.Tensor, grid: tuple) -> torch.Tensor:
    """Patch positional embeddings (1, G*G, E) resized bicubically to grid (h, w) -> (1, h*w, E);
    unchanged when the grid already matches. Smaller focal crops need it (msn src/deit.py)."""
    side = math.isqrt(pos.shape[1])
    if tuple(grid) == (side, side):
        return pos
    pos = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, E, G, G)
    pos = F.interpolate(pos, size=tuple(grid), mode="bicubic", align_corners=False)
    return pos.permute(0, 2, 3, 1).flatten(1, 2)  # (1, h*w, E)


def keep_tokens(x: torch.Tensor, mask_ratio: float, per_image: bool = False) -> torch.Tensor:
    """Random masking by dropping tokens: x (B, L, E) -> (B, floor(L * (1 - ratio)), E).
    Official: one randperm per forward, so every image keeps the same positions
    (msn src/deit.py patch_drop); `per_image` draws one mask per image instead (lightly)."""
    b, length, width = x.shape
    n = int(length * (1 - mask_ratio))
    if per_image:
        idx = torch.rand(b, length, device=x.device).argsort(1)[:, :n]  # (B, n)
    else:
        idx = torch.randperm(length, device=x.device)[:n].expand(b, n)  # (B, n)
    return x.gather(1, idx.unsqueeze(-1).expand(b, n, width))


class ViT(VisionTransformer):
    """torchvision's VisionTransformer without `heads`, so its state_dict loads into
    VisionTransformer(**vit_config(...)) with only heads.* missing. The forward reuses its parts
    (conv_proj, class_token, encoder.*) and adds what MSN needs: any input size (interpolated
    positional embeddings) and token dropping after the positional embedding."""

    def __init__(self, **config):
        super().__init__(**config)
        self.heads = nn.Identity()

    def tokens(self, x: torch.Tensor, mask_ratio: float = 0.0, per_image: bool = False):
        """x (B, C, H, W) -> [class; kept patch tokens] with positions added (B, 1 + L', E)."""
        x = self.conv_proj(x)  # (B, E, h, w)
        pos = self.encoder.pos_embedding  # (1, 1 + G*G, E), slot 0 is the class token's
        x = x.flatten(2).transpose(1, 2) + resize_pos_embedding(pos[:, 1:], x.shape[-2:])
        if mask_ratio > 0:  # the class token is always kept
            x = keep_tokens(x, mask_ratio, per_image)  # (B, L', E)
        cls = (self.class_token + pos[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, E)
        return torch.cat([cls, x], dim=1)

    def forward(self, x: torch.Tensor, mask_ratio: float = 0.0, per_image: bool = False):
        """x (B, C, H, W) -> class token after the final LayerNorm (B, E), the representation;
        equal to torchvision's forward at the native size without masking."""
        x = self.encoder.dropout(self.tokens(x, mask_ratio, per_image))
        return self.encoder.ln(self.encoder.layers(x))[:, 0]


def projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """3 Linear layers, BN + GELU after the first two; trunc-normal(0.02) weights, zero biases
    (msn src/msn_train.py init_model, use_bn: true)."""
    head = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(),
                         nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(),
                         nn.Linear(hidden_dim, out_dim))
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


class MSN(nn.Module):
    """Anchor encoder (ViT + projector), its EMA copy (the target encoder, no gradient) and the
    K learnable prototypes. The prototypes are a parameter of this module, so under DDP their
    gradient is averaged like every other (see msn_loss)."""

    def __init__(self, config: dict, hidden_dim=2048, projection_dim=256, num_prototypes=1024):
        super().__init__()
        self.encoder = ViT(**config)
        self.projector = projector(config["hidden_dim"], hidden_dim, projection_dim)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        bound = projection_dim ** -0.5  # U(-1/sqrt(D), 1/sqrt(D)) as msn src/msn_train.py
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, projection_dim)
                                       .uniform_(-bound, bound))  # (K, D)

    def forward(self, views: list, mask_ratio: float, per_image: bool = False):
        """views = [target, anchor, focal_1 .. focal_F], each (B, C, H_v, W_v) ->
        anchors z (V*B, D) view-major [masked anchor; focal_1; ..; focal_F], targets h (B, D).
        Only the anchor view is masked; the focal views go through as one group, so the
        projector's BN sees each resolution group separately, as official."""
        with torch.no_grad():
            h = self.target_projector(self.target_encoder(views[0]))  # (B, D)
        z = [self.projector(self.encoder(views[1], mask_ratio, per_image))]  # [(B, D)]
        if len(views) > 2:
            z.append(self.projector(self.encoder(torch.cat(views[2:]))))  # (F*B, D)
        return torch.cat(z), h

    def update_ema(self, ema: float) -> None:
        """theta_t <- ema theta_t + (1 - ema) theta, parameters only (BN statistics of the
        target projector come from its own forward passes, as official)."""
        update_ema([(self.target_encoder, self.encoder), (self.target_projector, self.projector)],
                   ema)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, without gradient (Sinkhorn's marginals, prototype counts)."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn(q: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Balanced assignment of the global batch (msn src/losses.py distributed_sinkhorn):
    q (B, K) -> (B, K) with rows summing to 1 and prototype marginals close to N/K.
    Masses and prototype sums are summed over ranks, so all N rows are balanced together.
    A prototype that no target reaches (softmax underflow) keeps mass 0 rather than 0/0 = NaN
    (the official code gives NaN); otherwise the clamp changes nothing."""
    n, k = q.shape[0] * world_size(), q.shape[1]
    tiny = torch.finfo(q.dtype).tiny
    q = q / all_reduce_sum(q.sum())
    for _ in range(iterations):
        q = q / all_reduce_sum(q.sum(0, keepdim=True)).clamp_min(tiny) / k  # prototype: 1/K
        q = q / q.sum(1, keepdim=True) / n  # each sample: mass 1/N
    return q * n


def entropy(p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Mean row entropy of probabilities p (rows) given log p."""
    return -(p * log_p).sum(-1).mean()


def msn_loss(z, h, prototypes, tau=0.1, sharpen=0.25, sinkhorn_iters=3, memax_weight=1.0):
    """MSN objective  L = CE(q, p) + memax_weight * (log K - H(mean p))  (msn src/losses.py).

    z:          (V*B, D) anchor embeddings, view-major (row i belongs to image i mod B)
    h:          (B, D)   target embeddings (no gradient)
    prototypes: (K, D)   learnable; the anchors' gradient reaches them (never pass .data)
    p = softmax(cos(z, P) / tau), as log-softmax; q = Sinkhorn(softmax(cos(h, P) / (tau *
    sharpen))), which equals sharpening softmax(cos / tau) with p^(1/T) (the official
    code's form, log(p^-q) and p^(1/T), can overflow when a probability underflows).
    Sinkhorn runs over the global batch and ME-MAX on the global mean prediction (all_reduce_mean,
    identity backward): with DDP's averaging, every gradient is that of the one-process loss on
    all N images. The official code instead all-reduce-sums the prototypes' gradient (W times
    this one); under AdamW without weight decay on them the update differs only through eps.
    Float32 with autocast off. Returns (loss, detached diagnostics).
    """
    with torch.autocast(z.device.type, enabled=False):
        p_norm = F.normalize(prototypes.float(), dim=1)
        logits = F.normalize(z.float(), dim=1) @ p_norm.T / tau  # (V*B, K)
        log_p = F.log_softmax(logits, dim=1)
        p = log_p.exp()
        with torch.no_grad():
            target_logits = F.normalize(h.float(), dim=1) @ p_norm.T / (tau * sharpen)  # (B, K)
            q = sinkhorn(F.softmax(target_logits, dim=1), sinkhorn_iters)
            used = all_reduce_sum(torch.bincount(q.argmax(1), minlength=q.shape[1]))
        views = z.shape[0] // h.shape[0]
        ce = -(q.repeat(views, 1) * log_p).sum(1).mean()  # targets tiled view-major
        p_mean = all_reduce_mean(p.mean(0))  # (K,) over the global batch
        memax = (p_mean * p_mean.log()).sum() + math.log(p_mean.shape[0])
        loss = ce + memax_weight * memax
    logs = {"cross_entropy": ce.detach(), "memax": memax.detach(),
            "prototypes_used": (used > 0).sum().float(),
            "target_entropy": entropy(q, q.clamp_min(1e-30).log()).detach(),
            "anchor_entropy": entropy(p, log_p).detach()}
    return loss, logs
