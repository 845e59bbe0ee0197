"""NNCLR: Nearest-Neighbor Contrastive Learning of visual representations (Dwibedi et al.,
arXiv 2104.14548). No official code was released; the wiring follows the paper and solo-learn
(solo/methods/nnclr.py, solo/losses/nnclr.py).

Shapes: B = images per process, D = embedding dim, K = support-set (queue) size,
N = B x world size (the global batch, after a gather).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.backbone import FEATURE_DIM, resnet
from common.dist import gather_with_grad, rank
from common.train import enqueue


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """3 FC layers [hidden, hidden, out] with BN after every one and ReLU after all but the last
    (paper, quoted in lightly's NNCLRProjectionHead; solo-learn), the output BN included.
    Linear biases are off before BN: its mean subtraction cancels them (lightly's heads;
    solo-learn keeps them, where they only ever receive a zero gradient)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
        nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim))


def prediction_head(dim: int, hidden_dim: int) -> nn.Sequential:
    """2 FC layers [hidden, dim]: BN + ReLU on the hidden layer, no BN or activation on the output
    (paper via lightly's NNCLRPredictionHead; solo-learn)."""
    return nn.Sequential(nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(), nn.Linear(hidden_dim, dim))


class NNCLR(nn.Module):
    """Backbone + projector + predictor, and the support set Q: a FIFO queue of past
    L2-normalised view-1 projections, kept as persistent buffers so checkpoints carry it."""

    def __init__(self, arch="resnet18", stem="cifar", image_size=32, hidden_dim=2048,
                 projection_dim=256, pred_hidden_dim=4096, queue_size=65536):
        super().__init__()
        self.backbone = resnet(arch, stem, image_size)
        self.projector = projection_head(FEATURE_DIM[arch], hidden_dim, projection_dim)
        self.predictor = prediction_head(projection_dim, pred_hidden_dim)
        # random unit vectors until K / N steps have filled the queue (solo-learn, lightly);
        # label -1 = unknown, so these never count as a correct neighbour in the NN accuracy
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_labels", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """Views x1, x2 (B, C, H, W) -> z (2, B, D) L2-normalised projections, p (2, B, D)
        predictions. Each view passes on its own, so BatchNorm statistics are per view, and the
        predictor sees the un-normalised projection (both as solo-learn)."""
        z, p = [], []
        for x in (x1, x2):
            h = self.projector(self.backbone(x))  # (B, D)
            p.append(self.predictor(h))
            z.append(F.normalize(h, dim=-1))
        return torch.stack(z), torch.stack(p)

    @torch.no_grad()
    def nearest_neighbours(self, z: torch.Tensor):
        """For L2-normalised z (..., D): the index (...) of the most cosine-similar support-set
        row and that row (..., D). Under no_grad: no gradient reaches z through the lookup."""
        idx = (z.to(self.queue.dtype) @ self.queue.T).argmax(-1)  # (..., K) -> (...)
        return idx, self.queue[idx]

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        """FIFO update with the global batch: z (N, D) normalised view-1 projections and their
        labels (N,) (-1 when unknown), both gathered from every rank by the caller, so all ranks
        hold the same queue. K must be a multiple of N (solo-learn asserts it; pretrain.py checks
        it at start), so a batch never straddles the end and nothing is dropped."""
        enqueue([self.queue, self.queue_labels], [z, labels], self.queue_ptr)


def _cross_view_nce(neighbours: torch.Tensor, p: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over this rank's B rows of -log softmax_k(n(nn_i) . n(p_k) / tau)[target i], the
    columns k running over the N predictions of the global batch (gathered with gradient)."""
    q = F.normalize(neighbours, dim=-1)  # (B, D)
    p = gather_with_grad(F.normalize(p, dim=-1))  # (N, D)
    logits = q @ p.T / tau  # (B, N)
    targets = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    return F.cross_entropy(logits, targets)


def nnclr_loss(neighbours: torch.Tensor, p: torch.Tensor, tau: float) -> torch.Tensor:
    """NNCLR objective  L = 1/2 L(NN(z1), p2) + 1/2 L(NN(z2), p1)  with
    L(nn, p) = -1/N sum_i log[ exp(n(nn_i) . n(p_i) / tau) / sum_k exp(n(nn_i) . n(p_k) / tau) ].

    neighbours: (2, B, D) support-set neighbours of each view's projection (no gradient).
    p:          (2, B, D) predictions of the two views (any scale: normalised here).
    The NN comes from the projection side and the positive from the *other* view's prediction;
    the negatives are the other view's predictions only (cross terms, N logits per row, as the
    paper and solo-learn; not lightly's NT-Xent with 2N - 1). Gradient flows through p only.

    Under DDP the predictions are gathered with gradient and row i's target is column
    rank * B + i. The value is this rank's mean over its B rows: its mean over ranks, which
    DDP's gradient averaging optimises, is the loss of the global batch. float32, autocast off.
    """
    with torch.autocast(p.device.type, enabled=False):
        neighbours, p = neighbours.float(), p.float()
        return 0.5 * (_cross_view_nce(neighbours[0], p[1], tau)
                      + _cross_view_nce(neighbours[1], p[0], tau))
