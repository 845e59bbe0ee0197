"""Loaders: the resumable, sharded pretraining loader of uint8 images (the device views start
from them), and the ordered, sharded evaluation loaders (kNN bank, test split)."""
import itertools
import signal

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.transforms.functional import pil_to_tensor

from common import dist
from common.augment import eval_transform
from common.data import load_split, num_classes, targets
from common.errors import UserError


def collate_images(batch):
    """[(uint8 (3, H_i, W_i), label)] -> uint8 (B, 3, H, W) zero-padded to the largest image,
    sizes (B, 2) as (H_i, W_i), labels (B,)."""
    images, labels = zip(*batch)
    sizes = torch.tensor([img.shape[1:] for img in images])
    if (sizes == sizes[0]).all():  # one size (CIFAR, STL-10): a single copy
        return torch.stack(images), sizes, torch.as_tensor(labels)
    h, w = sizes.max(0).values.tolist()
    out = torch.zeros(len(images), 3, h, w, dtype=torch.uint8)
    for i, img in enumerate(images):
        out[i, :, :img.shape[1], :img.shape[2]] = img
    return out, sizes, torch.as_tensor(labels)


class ArrayImages(torch.utils.data.Dataset):
    """A dataset held as one uint8 array (torchvision's CIFAR and STL-10 are), served a batch at
    a time: the DataLoader hands __getitems__ a batch's indices and the batch is one index op,
    with no PIL image made and decoded per image and no worker needed.
    images (N, 3, H, W) uint8, labels (N,) -> batches as collate_images makes them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices)
        sizes = torch.tensor(self.images.shape[2:]).repeat(len(idx), 1)  # (B, 2)
        return self.images[idx], sizes, self.labels[idx]

    @staticmethod
    def collate(batch):
        return batch  # __getitems__ made it


def array_images(ds) -> ArrayImages | None:
    """ds, or the dataset under --dev's Subset, as ArrayImages where it keeps its images in a
    uint8 array `data` (CIFAR: N x H x W x 3, STL-10: N x 3 x H x W); else None."""
    indices = None
    if isinstance(ds, Subset):
        ds, indices = ds.dataset, list(ds.indices)
    data = getattr(ds, "data", None)
    if str(getattr(data, "dtype", "")) != "uint8" or data.ndim != 4 or 3 not in data.shape[1::2]:
        return None
    images = torch.as_tensor(data)  # shares the array's memory
    images = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 else images
    labels = torch.as_tensor(targets(ds)).long()
    if indices is not None:
        images, labels = images[indices], labels[indices]
    return ArrayImages(images.contiguous(), labels)


def ignore_run_signals(worker_id: int) -> None:
    """worker_init_fn: a DataLoader worker ignores SIGTERM, SIGUSR1 and SIGINT. A signal sent to
    the whole process group (timeout, kill -TERM -PGID, Kubernetes, SLURM, torchrun) then
    reaches only the main process, which checkpoints at the next step boundary and shuts its
    workers down; a worker that died of it would crash the run before its checkpoint."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way: set_epoch(epoch, skip=n) leaves out
    this rank's first n indices (the batches a mid-epoch checkpoint had already trained)."""

    skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return self.num_samples - self.skip


def train_loader(ds, batch_size: int, num_workers: int, d, seed: int, collate_fn=None,
                 persistent: bool = False) -> DataLoader:
    """Shuffled, drop_last loader over this process's shard (its sampler: loader.sampler, a
    ResumableSampler). The shuffle order is a pure function of (seed, epoch), also for a single
    process; the loader's own generator (seed + rank, checkpointed) seeds the workers, so making
    batches draws nothing from the global RNG. `persistent` workers (kept across epochs) only
    for workers that draw no random numbers, or a resumed run would draw other views."""
    if len(ds) < batch_size * d.world_size:
        raise UserError(f"the dataset has {len(ds)} images, fewer than one global batch "
                        f"({batch_size} x {d.world_size} processes): lower --batch-size")
    sampler = ResumableSampler(ds, d.world_size, d.rank, shuffle=True, seed=seed,
                               drop_last=True)
    return DataLoader(ds, batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=d.device.type == "cuda", drop_last=True, collate_fn=collate_fn,
                      persistent_workers=persistent and num_workers > 0,
                      worker_init_fn=ignore_run_signals,
                      generator=torch.Generator().manual_seed(seed + d.rank))


def eval_loader(ds, batch_size: int, num_workers: int, d) -> DataLoader:
    """Ordered loader over this rank's shard of an evaluation split (kNN bank, test split):
    items r, r + W, r + 2W, ... of rank r of W, without the padding (repeated items) of
    DistributedSampler."""
    shard = Subset(ds, range(d.rank, len(ds), d.world_size))
    return DataLoader(shard, batch_size, num_workers=num_workers,
                      pin_memory=d.device.type == "cuda", worker_init_fn=ignore_run_signals)


def pretrain_loader(args, d) -> DataLoader:
    """The pretraining loader: batches of (uint8 images (B, 3, H, W) zero-padded to the largest,
    sizes (B, 2), labels (B,)) for common.device_views.BatchViews. Its workers only decode; a
    dataset held as one array (CIFAR, STL-10) needs none: each batch is one index op."""
    ds = load_split(args, args.data_dir, "pretrain", pil_to_tensor, args.seed, args.dev)
    collate, workers = collate_images, args.num_workers
    arrays = array_images(ds)
    if arrays is not None:  # nothing to decode: each batch is one index op, no workers
        ds, collate, workers = arrays, ArrayImages.collate, 0
        dist.print0(f"data: {len(ds)} images in memory, each batch sliced in this process "
                    "(the workers serve the kNN monitor)")
    # persistent workers: they only decode, so they draw no random numbers a resume must repeat
    return train_loader(ds, args.batch_size, workers, d, args.seed, collate, persistent=True)


def knn_loaders(args, d):
    """(bank loader, test loader, class count) of the kNN monitor: the labelled train split
    and the test split with the eval transform; None when the data has no labelled splits."""
    test_tf = eval_transform(args)
    bank = load_split(args, args.data_dir, "train", test_tf, args.seed, args.dev)
    test = load_split(args, args.data_dir, "test", test_tf, args.seed, args.dev)
    if bank is None or test is None or not num_classes(bank):
        dist.print0("kNN monitor off: the data has no labelled train/ and val/ splits")
        return None
    return (eval_loader(bank, 512, args.num_workers, d),
            eval_loader(test, 512, args.num_workers, d), num_classes(bank))
