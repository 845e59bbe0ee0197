"""Weighted kNN evaluation on L2-normalised backbone features (InstDisc/DINO protocol)."""
import torch
import torch.nn.functional as F

from common.train import autocast


@torch.no_grad()
def extract_features(encoder, loader, device, precision="fp32"):
    """(N, D) L2-normalised features of `encoder` in eval mode and the (N,) labels."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for x, y in loader:
        with autocast(precision, device):
            f = encoder(x.to(device, non_blocking=True))
        feats.append(F.normalize(f.float(), dim=1))
        labels.append(y.to(device))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, k: int, temperature: float, num_classes: int,
                 chunk: int = 256):
    """Class scores (M, num_classes) of each test feature: the sum of exp(cos / T) over its k
    most similar training features, per class. The test set is processed in chunks of `chunk`
    rows, so memory stays at chunk x N similarities (50k x 10k runs in bounded memory)."""
    k = min(k, train_f.shape[0])
    scores = []
    for start in range(0, test_f.shape[0], chunk):
        sim = test_f[start:start + chunk] @ train_f.T  # (m, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def accuracy(scores, labels, k: int = 200):
    """Top-1 and top-5 accuracy in percent; top-5 only when k >= 5 and there are >= 5 classes
    (with fewer neighbours, later ranks are empty votes, so top-5 would be inflated)."""
    result = {"top1": (scores.argmax(1) == labels).float().mean().item() * 100}
    if k >= 5 and scores.shape[1] >= 5:
        top5 = scores.topk(5, dim=1).indices
        result["top5"] = (top5 == labels[:, None]).any(1).float().mean().item() * 100
    return result


def knn_eval(encoder, bank_loader, test_loader, k, temperature, num_classes, device,
             precision="fp32"):
    """kNN top-1/top-5 (percent) of `encoder`: bank = train split with the eval transform."""
    train_f, train_y = extract_features(encoder, bank_loader, device, precision)
    test_f, test_y = extract_features(encoder, test_loader, device, precision)
    scores = knn_classify(train_f, train_y, test_f, k, temperature, num_classes)
    return accuracy(scores, test_y, k)
