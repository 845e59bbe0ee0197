"""MMCR: Maximum Manifold Capacity Representations (Yerxa et al., arXiv 2303.03307).

Shapes: B = images per process, V = views per image, D = embedding dim,
N = B x world size (the global batch, after a gather).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.backbone import FEATURE_DIM, resnet
from common.dist import gather, gather_with_grad, rank
from common.train import update_ema


def projector(in_dim: int, hidden_dims: list, out_dim: int) -> nn.Sequential:
    """[Linear (no bias) -> BN -> ReLU] per hidden width, then Linear (no bias); no BN on the
    output. Official CIFAR/STL: hidden [512], out 128 (mmcr/cifar_stl/models.py); official
    ImageNet: hidden [8192, 8192], out 512 (mmcr/imagenet/models.py)."""
    layers, width = [], in_dim
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden),
                   nn.ReLU(inplace=True)]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, out_dim, bias=False))


class MMCR(nn.Module):
    """Backbone + projector, and with `momentum_branch` an EMA copy of both (the official
    ImageNet `MMCR_Momentum` objective) that sees the same views and gets no gradient."""

    def __init__(self, arch="resnet18", stem="cifar", image_size=32, hidden_dims=(512,),
                 projection_dim=128, momentum_branch=False, zero_init_residual=False):
        super().__init__()
        self.backbone = resnet(arch, stem, image_size, zero_init_residual)
        self.projector = projector(FEATURE_DIM[arch], hidden_dims, projection_dim)
        self.momentum_backbone = self.momentum_projector = None
        if momentum_branch:
            self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
            self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, x: torch.Tensor, num_views: int):
        """x (B*V, C, H, W), each image's views contiguous -> z (B, V, D), z_momentum or None."""
        z = self.projector(self.backbone(x))  # (B*V, D)
        z_momentum = None
        if self.momentum_backbone is not None:
            with torch.no_grad():
                z_momentum = self.momentum_projector(self.momentum_backbone(x))
                z_momentum = z_momentum.unflatten(0, (-1, num_views))
        return z.unflatten(0, (-1, num_views)), z_momentum

    def update_ema(self, ema: float) -> None:
        """The momentum branch follows the online one with EMA momentum `ema` (parameters only,
        BN buffers not copied, as the official mmcr/imagenet/misc.py)."""
        update_ema([(self.momentum_backbone, self.backbone),
                    (self.momentum_projector, self.projector)], ema)


def nuclear_norm(x: torch.Tensor) -> torch.Tensor:
    """Sum of singular values of the last two dims (batched); singular values only (no U, V)."""
    return torch.linalg.svdvals(x).sum(-1)


def gather_local_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 in which only this rank's own rows carry gradient: the others'
    are gathered without it and this rank's slice is put back (the official ImageNet code,
    mmcr/imagenet/loss_mmcr_momentum.py)."""
    everyone = gather(x.detach())
    n = x.shape[0]
    return torch.cat([everyone[:rank() * n], x, everyone[(rank() + 1) * n:]])


def mmcr_loss(z: torch.Tensor, z_momentum: torch.Tensor | None = None, lmbda: float = 0.0,
              local_gradient: bool = False):
    """MMCR objective  L = -||C||_* + lmbda * mean_b ||Z_b||_*  over the global batch.

    z:          (B, V, D) online embeddings of V views of B images (any scale: each view is
                L2-normalised here, so the loss is invariant to the embedding scale).
    z_momentum: (B, V, D) momentum-branch embeddings or None; then each centroid is the mean of
                the online and the momentum centroids (official MMCR_Momentum), and the local
                term uses the online views only.
    C = (N, D) centroids, not re-normalised; Z_b = (V, D) views of image b.

    Under DDP the views of all ranks are gathered before the SVD, so ||C||_* spans all N
    images on every rank (as official). By default with gradient (gather_with_grad): after
    DDP's averaging each rank holds the gradient of L, whatever the world size. With
    `local_gradient`, as the official ImageNet code, only this rank's rows carry gradient:
    after DDP's averaging that is 1/world size of it (LARS rescales weight matrices, so only the
    1-D parameters, which step with their plain gradient, take steps 1/world size as long).
    Runs in float32, autocast off (svdvals has no half-precision kernels). Returns (loss,
    detached diagnostics).
    """
    gather_views = gather_local_grad if local_gradient else gather_with_grad
    with torch.autocast(z.device.type, enabled=False):
        z = gather_views(F.normalize(z.float(), dim=-1))  # (N, V, D)
        c = z.mean(1)  # (N, D)
        if z_momentum is not None:
            c = 0.5 * (c + gather(F.normalize(z_momentum.float(), dim=-1)).mean(1))
        global_nuc = nuclear_norm(c)
        if lmbda > 0:
            local_nuc = nuclear_norm(z).mean()
            loss = -global_nuc + lmbda * local_nuc
        else:  # the local term is only logged: no graph through its SVDs
            with torch.no_grad():
                local_nuc = nuclear_norm(z).mean()
            loss = -global_nuc
    return loss, {"global_nuclear_norm": global_nuc.detach(), "local_nuclear_norm":
                  local_nuc.detach()}
