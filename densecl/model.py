"""DenseCL: Dense Contrastive Learning (Wang et al., CVPR 2021, arXiv 2011.09157).

Shapes: B = images per process, N = B x world size (after a gather), C = backbone channels,
H, W = size of the last feature map, S = H x W locations, D = embedding dim, K = queue length.
Query = view 1 through the online network; key = view 2 through the momentum copy, one
direction only, as the official openselfsup/models/densecl.py.
"""
import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.backbone import FEATURE_DIM, resnet
from common.dist import broadcast, gather, rank, world_size
from common.train import enqueue, update_ema


def feature_map(net: nn.Module, x):
    """The last (C5) feature map (B, C, H/stride, W/stride) of a common.backbone.resnet() trunk,
    before pooling."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises `num_splits` contiguous chunks of the batch
    separately (MoCo's single-GPU stand-in for per-GPU BN). Running statistics are the mean over
    the chunks. On a GPU the chunks go through one call (as MoCo's SplitBatchNorm, to launch few
    kernels); on the CPU one call per chunk is faster (no copies, channels-last kernels: 4 ms
    against 8-34 ms a layer here). A subclass with the same tensors, so the state_dict keys stay
    torchvision's."""

    def __init__(self, num_features: int, num_splits: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x):
        n = self.num_splits
        if n == 1 or not self.training:
            return super().forward(x)
        running = self.running_mean.repeat(n), self.running_var.repeat(n)  # (n*C,) each
        normalise = split_norm_one_call if x.is_cuda else split_norm_per_chunk
        y = normalise(x, n, running, self.weight, self.bias, self.momentum, self.eps)
        with torch.no_grad():  # batch_norm updated each chunk's statistics in `running`
            self.running_mean.copy_(running[0].view(n, -1).mean(0))
            self.running_var.copy_(running[1].view(n, -1).mean(0))
            self.num_batches_tracked += 1
        return y  # (B, C, H, W) in x's memory format


def split_norm_per_chunk(x, n: int, running: tuple, weight, bias, momentum, eps):
    """Each of the n chunks of x (B, C, H, W) normalised by its own batch_norm call."""
    chunks = zip(x.chunk(n), *(r.chunk(n) for r in running))
    return torch.cat([F.batch_norm(chunk, mean, var, weight, bias, True, momentum, eps)
                      for chunk, mean, var in chunks])


def split_norm_one_call(x, n: int, running: tuple, weight, bias, momentum, eps):
    """The n chunks of x (B, C, H, W) as the channels of one (B / n, n C, H, W) batch, in x's
    memory format, through one batch_norm call."""
    b, c, h, w = x.shape
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and \
        c > 1 else torch.contiguous_format
    chunks = torch.empty((b // n, n * c, h, w), dtype=x.dtype, device=x.device,
                         memory_format=layout)
    chunks.view(b // n, n, c, h, w).copy_(x.unflatten(0, (n, b // n)).transpose(0, 1))
    y = F.batch_norm(chunks, *running, weight.repeat(n), bias.repeat(n), True, momentum, eps)
    out = torch.empty_like(x)
    out.unflatten(0, (n, b // n)).copy_(y.view(b // n, n, c, h, w).transpose(0, 1))
    return out


def official_init(net: nn.Module, kind=nn.Conv2d) -> nn.Module:
    """Kaiming-normal (fan_in, ReLU gain) weights and zero biases of every `kind` layer: the
    official init_weights of the ResNet (openselfsup/models/backbones/resnet.py) and of the neck
    ('kaiming'); torchvision's own init uses fan_out. BN keeps torchvision's weights 1, biases 0."""
    for m in net.modules():
        if isinstance(m, kind):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Swap every BatchNorm2d of `module` for a SplitBatchNorm2d with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            split = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps,
                                     momentum=child.momentum)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batchnorm(child, num_splits)
    return module


class DenseCLNeck(nn.Module):
    """The official DenseCLNeck: global GAP -> Linear -> ReLU -> Linear and dense
    Conv1x1 -> ReLU -> Conv1x1, both with biases and without BN."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))
        self.dense = nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.ReLU(inplace=True),
                                   nn.Conv2d(hidden_dim, out_dim, 1))
        official_init(self.mlp, nn.Linear)  # the official neck's init: its Linear layers only

    def forward(self, f: torch.Tensor):
        """f (B, C, H, W) -> global (B, D), dense (B, D, S); neither normalised."""
        return self.mlp(f.mean((2, 3))), self.dense(f).flatten(2)


class DenseCL(nn.Module):
    """Online backbone + neck, their momentum copies (no gradient) and the two key queues.

    bn_splits: BN groups per process (SplitBatchNorm2d). The key batch is shuffled across all
    N images of all processes before it is cut into groups (official shuffle-BN under DDP,
    MoCo's CIFAR recipe on one device): a key's BN statistics come from a random group of
    images, not from its query's group, so they cannot give the positive away."""

    def __init__(self, arch="resnet18", stem="cifar", image_size=32, hidden_dim=None,
                 projection_dim=128, queue_size=4096, bn_splits=1):
        super().__init__()
        width = FEATURE_DIM[arch]
        self.backbone = split_batchnorm(official_init(resnet(arch, stem, image_size)), bn_splits)
        self.neck = DenseCLNeck(width, hidden_dim or width, projection_dim)  # hidden = C
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_neck = copy.deepcopy(self.neck).requires_grad_(False)
        # persistent buffers: the queues travel with every checkpoint (random unit init)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_dense", F.normalize(torch.randn(queue_size, projection_dim),
                                                        dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_fill", torch.zeros((), dtype=torch.long))  # real keys held

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor) -> dict:
        """x_q, x_k (B, 3, H_img, W_img): views 1 and 2 of the same B images."""
        f_q = feature_map(self.backbone, x_q)  # (B, C, H, W)
        if min(f_q.shape[-2:]) < 4:  # python shows a warning once per call site
            warnings.warn(f"DenseCL: the last feature map is {tuple(f_q.shape[-2:])}, smaller "
                          "than 4x4: the dense loss degenerates towards the global one (use the "
                          "cifar stem or larger images)")
        q, q_grid = self.neck(f_q)  # (B, D), (B, D, S)
        with torch.no_grad():
            keys = self.momentum_keys(x_k)
        return {"f_q": f_q, "q": F.normalize(q, dim=1),
                "q_grid": F.normalize(q_grid, dim=1), **keys}

    @torch.no_grad()
    def momentum_keys(self, x_k: torch.Tensor) -> dict:
        """Keys of the momentum backbone + neck under shuffle-BN; every output in the original
        image order. Local: f_k (B, C, H, W), k (B, D), k_grid (B, D, S); global for the queues:
        k_all (N, D) and k2_all (N, D), the pooled dense key of each image (official k2)."""
        n_proc, b = world_size(), x_k.shape[0]
        x_all = gather(x_k)  # (N, 3, H_img, W_img)
        perm = broadcast(torch.randperm(x_all.shape[0], device=x_k.device))  # (N,)
        f = feature_map(self.momentum_backbone, x_all[perm.view(n_proc, b)[rank()]])
        g, d = self.momentum_neck(f)  # (B, D), (B, D, S), shuffled order
        shuffled = (f, F.normalize(g, dim=1), F.normalize(d, dim=1),
                    F.normalize(d.mean(2), dim=1))  # k2 = GAP of the dense output, normalised
        unshuffle = perm.argsort()
        f_k, k_all, k_grid, k2_all = (gather(t)[unshuffle] for t in shuffled)  # (N, ...)
        mine = slice(rank() * b, (rank() + 1) * b)
        return {"f_k": f_k[mine], "k": k_all[mine], "k_grid": k_grid[mine], "k_all": k_all,
                "k2_all": k2_all}

    def update_ema(self, ema: float) -> None:
        """xi <- ema xi + (1 - ema) theta over backbone and neck parameters (BN buffers keep
        their own statistics, as official _momentum_update_key_encoder)."""
        update_ema([(self.momentum_backbone, self.backbone), (self.momentum_neck, self.neck)],
                   ema)

    @torch.no_grad()
    def enqueue(self, k_all: torch.Tensor, k2_all: torch.Tensor) -> None:
        """FIFO: the N gathered keys (N, D) each over the oldest N slots of both queues."""
        enqueue([self.queue, self.queue_dense], [k_all, k2_all], self.queue_ptr)
        size, n = self.queue.shape[0], k_all.shape[0]
        self.queue_fill.clamp_(max=size - n).add_(n)  # min(size, fill + n)


@torch.no_grad()
def match_locations(f_q: torch.Tensor, f_k: torch.Tensor) -> torch.Tensor:
    """For each query location, the key location whose *backbone* feature is most
    cosine-similar: f_q, f_k (B, C, H, W) or (B, C, S) -> (B, S) indices, row-major.
    An index only: no gradient passes through the matching."""
    f_q, f_k = (F.normalize(f.float().flatten(2), dim=1) for f in (f_q, f_k))  # (B, C, S)
    sim = torch.einsum("bcs,bct->bst", f_q, f_k)  # (B, S_q, S_k)
    return sim.argmax(2)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float):
    """Mean over M of cross-entropy([q.k, q.queue] / tau, label 0): q, k (M, D), queue (K, D)."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / tau  # (M, 1 + K)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def densecl_loss(q, k, queue, q_grid, k_grid, queue_dense, match, tau=0.2, dense_weight=0.5):
    """L = (1 - lambda) L_global + lambda L_dense, official DenseCL.

    q:           (B, D) online global embedding of view 1 (L2-normalised here)
    k:           (B, D) momentum global key of view 2 (no gradient)
    queue:       (K, D) global negatives (past keys k, unit rows as stored)
    q_grid:      (B, D, S) online dense embeddings of view 1
    k_grid:      (B, D, S) momentum dense keys of view 2 (no gradient)
    queue_dense: (K, D) dense negatives (past pooled dense keys, one per image)
    match:       (B, S) key location matched to each query location (match_locations)
    L_global = InfoNCE per image; L_dense = InfoNCE per location, against the key at the
    matched location, averaged over all B x S locations. Float32, autocast off.
    Returns (loss, detached diagnostics).
    """
    with torch.autocast(q.device.type, enabled=False):
        q, q_grid = F.normalize(q.float(), dim=1), F.normalize(q_grid.float(), dim=1)
        k, k_grid = F.normalize(k.float(), dim=1), F.normalize(k_grid.float(), dim=1)
        k_pos = k_grid.gather(2, match[:, None].expand(-1, k_grid.shape[1], -1))  # (B, D, S)
        loss_global = info_nce(q, k.detach(), queue.float(), tau)
        loss_dense = info_nce(q_grid.transpose(1, 2).flatten(0, 1),  # (B*S, D)
                              k_pos.detach().transpose(1, 2).flatten(0, 1), queue_dense.float(),
                              tau)
        loss = (1 - dense_weight) * loss_global + dense_weight * loss_dense
    return loss, {"loss_global": loss_global.detach(), "loss_dense": loss_dense.detach()}


@torch.no_grad()
def true_match(boxes_q: torch.Tensor, boxes_k: torch.Tensor, h: int, w: int):
    """Ground-truth correspondence from the crop geometry: for each query cell (its centre),
    the key cell that contains the same image point, and whether that point lies in the key
    crop. boxes (B, 5) = (top, left, height, width, flipped) as fractions of the source image.
    Returns target (B, S) long and valid (B, S) bool, cells in row-major order."""
    v, u = torch.meshgrid((torch.arange(h, device=boxes_q.device) + 0.5) / h,
                          (torch.arange(w, device=boxes_q.device) + 0.5) / w, indexing="ij")
    u, v = u.flatten()[None], v.flatten()[None]  # (1, S) query cell centres in view coordinates
    top, left, height, width, flip = boxes_q.T[..., None]  # each (B, 1)
    x = left + torch.where(flip > 0.5, 1 - u, u) * width  # (B, S) image coordinates
    y = top + v * height
    top, left, height, width, flip = boxes_k.T[..., None]
    u_k, v_k = (x - left) / width, (y - top) / height  # (B, S) key-view coordinates
    u_k = torch.where(flip > 0.5, 1 - u_k, u_k)
    valid = (u_k >= 0) & (u_k < 1) & (v_k >= 0) & (v_k < 1)
    row, col = (v_k * h).floor().clamp(0, h - 1), (u_k * w).floor().clamp(0, w - 1)
    return (row * w + col).long(), valid


@torch.no_grad()
def match_accuracy(match, boxes_q, boxes_k, h: int, w: int) -> torch.Tensor:
    """Share of query cells whose centre lies in the key crop that `match` (B, S) sends to
    the true key cell (0 when no cell of the batch has a true partner)."""
    target, valid = true_match(boxes_q, boxes_k, h, w)
    hits = ((match == target) & valid).sum()
    return hits / valid.sum().clamp(min=1)
