"""Weighted kNN evaluation on L2-normalised backbone features (InstDisc/DINO protocol), with the
bank and the test split sharded over the ranks of a torchrun job."""
import torch
import torch.nn.functional as F

from common.dist import gather, gather_rows, world_size
from common.train import autocast


@torch.no_grad()
def extract_features(encoder, loader, device, precision="fp32", normalize=True):
    """(N, D) outputs of `encoder` in eval mode (L2-normalised features, or as they are when not
    `normalize`: a classifier's logits) and the (N,) labels."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for x, y in loader:
        with autocast(precision, device):
            f = encoder(x.to(device, non_blocking=True))
        feats.append(F.normalize(f.float(), dim=1) if normalize else f.float())
        labels.append(y.to(device))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def nearest(test_f, train_f, train_y, k: int, chunk: int = 256):
    """The k most similar training features of each test feature: similarities and labels,
    (M, k) each. Test rows go in chunks of `chunk`, so memory stays at chunk x N similarities
    (50k x 10k runs in bounded memory)."""
    k = min(k, train_f.shape[0])
    sims, labels = [], []
    for start in range(0, test_f.shape[0], chunk):
        top_sim, top_idx = (test_f[start:start + chunk] @ train_f.T).topk(k, dim=1)  # (m, k)
        sims.append(top_sim)
        labels.append(train_y[top_idx])
    return torch.cat(sims), torch.cat(labels)


def vote(sims, labels, temperature: float, num_classes: int):
    """Class scores (M, num_classes): the sum of exp(cos / T) over the neighbours, per class."""
    votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
    return votes.scatter_add_(1, labels, (sims / temperature).exp())


def accuracy(scores, labels, k: int = 200):
    """Top-1 and top-5 accuracy in percent; top-5 only when k >= 5 and there are >= 5 classes
    (with fewer neighbours, later ranks are empty votes, so top-5 would be inflated)."""
    result = {"top1": (scores.argmax(1) == labels).float().mean().item() * 100}
    if k >= 5 and scores.shape[1] >= 5:
        top5 = scores.topk(5, dim=1).indices
        result["top5"] = (top5 == labels[:, None]).any(1).float().mean().item() * 100
    return result


@torch.no_grad()
def merge_shards(sims, labels, k: int):
    """Each rank's (M, k') candidates -> the k best of all ranks' (M, k), on every rank. Ranks
    with fewer than k bank rows pad with -inf."""
    pad = k - sims.shape[1]
    sims = F.pad(sims, (0, pad), value=-float("inf"))
    labels = F.pad(labels, (0, pad))
    n = sims.shape[0]
    sims = gather(sims).unflatten(0, (-1, n)).permute(1, 0, 2).flatten(1)  # (M, W*k)
    labels = gather(labels).unflatten(0, (-1, n)).permute(1, 0, 2).flatten(1)
    top, idx = sims.topk(k, dim=1)
    return top, labels.gather(1, idx)


def knn_eval(encoder, bank_loader, test_loader, k, temperature, num_classes, device,
             precision="fp32"):
    """kNN top-1/top-5 (percent) of `encoder`: bank = train split with the eval transform.
    Under torchrun each rank extracts its shard of both splits; the test features are gathered,
    each rank finds the k nearest of its bank shard for every test image, and the candidates of
    all ranks are merged, so every rank gets the one-process result without holding the bank."""
    train_f, train_y = extract_features(encoder, bank_loader, device, precision)
    test_f, test_y = (gather_rows(t) for t in extract_features(encoder, test_loader, device,
                                                               precision))
    sims, labels = nearest(test_f, train_f, train_y, k)
    if world_size() > 1:
        sims, labels = merge_shards(sims, labels, k)
    return accuracy(vote(sims, labels, temperature, num_classes), test_y, k)


class KnnMonitor:
    """The kNN monitor of a pretraining run: {"knn_top1": ..., "knn_top5": ...} of a backbone at
    epoch 0 (untrained), every `every` epochs and after the last one; {} at other epochs, with
    `every` 0, or when `loaders` (common.loaders.knn_loaders) is None (unlabelled data)."""

    def __init__(self, loaders, k: int, temperature: float, every: int, last_epoch: int, d,
                 precision: str):
        self.loaders, self.k, self.temperature = loaders, k, temperature
        self.every, self.last_epoch = every, last_epoch
        self.device, self.precision = d.device, precision

    def __call__(self, backbone, epoch: int) -> dict:
        if self.loaders is None or not self.every or (epoch % self.every
                                                      and epoch != self.last_epoch):
            return {}
        bank, test, classes = self.loaders
        acc = knn_eval(backbone, bank, test, self.k, self.temperature, classes, self.device,
                       self.precision)
        return {f"knn_{k}": v for k, v in acc.items()}
