"""DenseCL pretraining (Dense Contrastive Learning, a MoCo-v2 global loss plus a dense one).

    python densecl/pretrain.py --dataset cifar10 --batch-size 128          # one GPU (or CPU)
    torchrun --nproc_per_node 8 densecl/pretrain.py --dataset imagefolder --data-dir ...
        # the official ImageNet recipe: ResNet-50, global batch 256, lr 0.03
    python densecl/pretrain.py --output-dir runs/densecl/<run> --resume auto  # continue a run
    python densecl/pretrain.py --dataset synthetic --max-epochs 2 --dev      # offline smoke run
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

import torch

from common import dist
from common.augment import View
from common.backbone import add_resnet_args, resolve_stem
from common.checkpoint import Checkpoint
from common.data import pretrain_images
from common.device_views import BatchViews
from common.errors import run_main
from common.flags import (add_common_args, at_least, by_recipe, cap_queue, fill_recipe, fraction,
                          momentum, parse, parser, positive, resolve_learning_rate)
from common.knn import KnnMonitor
from common.loaders import knn_loaders, pretrain_loader
from common.log import Meter, RunLog, describe_run, learning_rate_rule
from common.runtime import resolve_runtime, tune_process
from common.signals import Signals
from common.train import autocast, backward_step, warmup_cosine
from densecl.model import DenseCL, densecl_loss, match_accuracy, match_locations

# lightly's MoCo CIFAR-10 benchmark (docs/source/getting_started/benchmarks): batch 128, SGD
# 0.06 per 128 images (0.12 per 256), wd 5e-4, EMA 0.99, queue 4096 (the official 65536
# exceeds CIFAR-10)
CIFAR = dict(backbone="resnet18", batch_size=128, max_epochs=200, learning_rate=None,
             base_learning_rate=0.12, warmup_duration=0.0, weight_decay=5e-4, ema=0.99,
             queue_size=4096)
RECIPES = {
    "cifar": CIFAR,
    "stl10": CIFAR,  # no reference trains DenseCL on STL-10: the CIFAR recipe at 64 px
    # official (configs/selfsup/densecl/densecl_imagenet_200ep.py): ResNet-50, SGD 0.03 per 256
    # images, wd 1e-4, EMA 0.999, queue 65536, 200 epochs, no warmup; 32 images per GPU
    # (8 GPUs: the official global batch of 256)
    "imagenet": dict(backbone="resnet50", batch_size=32, max_epochs=200, learning_rate=None,
                     base_learning_rate=0.03, warmup_duration=0.0, weight_decay=1e-4,
                     ema=0.999, queue_size=65536),
}


def get_args(argv=None):
    p = parser("DenseCL pretraining")
    add_common_args(p, RECIPES, knn_temperature=0.1)
    g = p.add_argument_group("densecl", "SGD (momentum 0.9), cosine decay per step")
    add_resnet_args(g, RECIPES)
    a, recipe = g.add_argument, dict(default=argparse.SUPPRESS)
    a("--tau", type=positive, default=0.2, help="InfoNCE temperature of both losses (official "
      "0.2)")
    a("--dense-weight", type=fraction, default=0.5, help="lambda: loss = (1 - lambda) global + "
      "lambda dense (official 0.5; 0 gives MoCo v2)")
    a("--queue-size", type=at_least(1), **recipe, help="length K of both key queues, a "
      "multiple of the global batch and at most the training set (larger is shrunk, with a "
      f"notice) {by_recipe(RECIPES, 'queue_size')}")
    a("--ema", type=momentum, **recipe, help="EMA momentum of the momentum backbone and heads "
      f"(constant) {by_recipe(RECIPES, 'ema')}")
    a("--bn-splits", type=at_least(1), default=None, help="BatchNorm groups per process; the "
      "key batch is shuffled over all processes before the split. Unset: 8 on one process "
      "(MoCo's CIFAR split BN; fewer if the batch is too small), 1 under torchrun (official "
      "shuffle-BN)")
    a("--hidden-dim", type=at_least(1), default=None, help="hidden width of both heads (unset: "
      "the backbone width, as the official neck)")
    a("--projection-dim", type=at_least(1), default=128, help="embedding dim D")
    # resolved once, in this order: the command line (a resumed run's own flags where it is
    # silent), the recipe, then the data and the machine
    args = parse(p, argv, "densecl", RECIPES)
    fill_recipe(args, RECIPES)
    resolve_runtime(args)
    world = dist.launched_world_size()
    images = args.batch_size * world
    resolve_learning_rate(p, args, images)
    args.bn_splits = args.bn_splits or default_bn_splits(args.batch_size, world)
    check_sizes(p, args, images)
    # at most one epoch: a longer queue would hold an image's own older key among its negatives
    epoch = pretrain_images(args) // images * images
    args.queue_size = cap_queue(args.queue_size, epoch, "--queue-size", "is more than one "
                                f"epoch of the training set ({epoch} images)")
    args.stem = resolve_stem(args.stem, args.recipe)
    return args


def default_bn_splits(batch_size: int, world: int) -> int:
    """8 BN groups on one process (MoCo CIFAR demo), fewer when the batch is too small for
    groups of 2; 1 under torchrun, where each process is a group (official shuffle-BN)."""
    splits = 8 if world == 1 else 1
    while splits > 1 and (batch_size % splits or batch_size // splits < 2):
        splits //= 2
    return splits


def check_sizes(p, args, images: int) -> None:
    """Queue and BN-group sizes against the batch (`images` per step), before any data is
    loaded."""
    if args.batch_size % args.bn_splits or args.batch_size // args.bn_splits < 2:
        p.error(f"--batch-size {args.batch_size} must split into --bn-splits {args.bn_splits} "
                "groups of at least 2 images each")
    if args.queue_size % images:
        p.error(f"--queue-size {args.queue_size} must be a multiple of the global batch "
                f"{images} ({args.batch_size} x {images // args.batch_size} processes)")


def pretrain_views(args) -> list:
    """Two MoCo-v2 views (official DenseCL pipeline); Gaussian blur only for the imagenet recipe
    (none at 32 px, as lightly's CIFAR benchmarks)."""
    view = View(args.image_size, args.mean, args.std, scale=(0.2, 1.0),
                blur_p=0.5 if args.recipe == "imagenet" else 0.0)
    return [view, view]


def train_step(net, model, x_q, x_k, boxes, optimizer, scaler, lr, args) -> dict:
    """One step: EMA, forward (keys under shuffle-BN), matching, loss, backward, SGD, enqueue.
    net: the (DDP/compiled) module to call; model: the plain module owning EMA and queues.
    boxes (B, 2, 5): crop geometry of the two views, for the matching accuracy."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.update_ema(args.ema)  # before the keys, as official forward_train
    with autocast(args.precision, x_q.device):
        out = net(x_q, x_k)
    match = match_locations(out["f_q"], out["f_k"])  # (B, S)
    loss, logs = densecl_loss(out["q"], out["k"], model.queue, out["q_grid"], out["k_grid"],
                              model.queue_dense, match, args.tau, args.dense_weight)
    backward_step(loss, optimizer, scaler)
    model.enqueue(out["k_all"], out["k2_all"])  # after the loss: the queue held older keys
    h, w = out["f_q"].shape[-2:]
    return {"loss": loss.detach(), **logs, "lr": lr,
            "match_acc": match_accuracy(match, boxes[:, 0], boxes[:, 1], h, w),
            "queue_fill": model.queue_fill / model.queue.shape[0]}


def main(argv=None):
    args = get_args(argv)
    d = dist.setup(args.device, args.dist_timeout)
    tune_process(args, d.rank)

    # ---- data: B images x 2 views (+ their crop boxes) per process and step; kNN splits
    loader, make_views = pretrain_loader(args, d), BatchViews(pretrain_views(args), d.device)
    knn = KnnMonitor(knn_loaders(args, d), args.num_neighbours, args.temperature,
                     args.eval_every, args.max_epochs, d, args.precision)

    # ---- model, optimizer: SGD on the online backbone + neck only
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = DenseCL(args.backbone, args.stem, args.image_size, args.hidden_dim,
                    args.projection_dim, args.queue_size, args.bn_splits)
    model = model.to(d.device, memory_format=memory_format)
    net = dist.prepare_model(model, d, sync_bn=False)  # SyncBN would undo the shuffle-BN
    net = torch.compile(net) if args.compile else net
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.learning_rate, momentum=0.9,
                                weight_decay=args.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(d.device.type) if args.precision == "fp16" else None
    total = args.max_epochs * len(loader)
    warmup = int(args.warmup_duration * total)
    global_batch = args.batch_size * d.world_size
    dist.print0(describe_run(args))
    dist.print0(f"world size {d.world_size} | per process {args.batch_size} images x 2 views | "
                f"global {global_batch} images per step | {len(loader)} steps/epoch | peak lr "
                f"{args.learning_rate:g} ({learning_rate_rule(args, global_batch)}) | queues "
                f"{args.queue_size} | BatchNorm: key batch shuffled over {global_batch} images, "
                f"{args.bn_splits} group(s) of {args.batch_size // args.bn_splits} per process "
                f"| {args.output_dir}")

    # ---- train, from where last.pt stopped: epoch, batches of it done, global step
    ckpt = Checkpoint("densecl", args, d, model, model.backbone, optimizer, scaler,
                      loader.generator)
    meter = Meter(d.device)
    epoch, batch, step = ckpt.resume(meter)  # (0, 0, 0) for a new run
    if epoch == args.max_epochs:
        return  # finished: resume() said so
    with Signals(args.checkpoint_every, d) as signals, \
            RunLog(args, d, args.resume is None, meter) as log:
        if step == 0:
            log.epoch({"epoch": 0, "step": 0, **knn(model.backbone, 0)})  # untrained
        for epoch in range(epoch, args.max_epochs):
            loader.sampler.set_epoch(epoch, skip=batch * args.batch_size)  # the rest of it
            for images in meter.timed(log.bar(loader, epoch, batch)):
                views, boxes, _ = make_views(images)  # 2 x (B, C, H, W), (B, 2, 5)
                x_q, x_k = (v.contiguous(memory_format=memory_format) for v in views)
                lr = warmup_cosine(step, total, warmup, args.learning_rate)
                out = train_step(net, model, x_q, x_k, boxes, optimizer, scaler, lr, args)
                step, batch = step + 1, batch + 1
                meter.add(out, step)  # summed on the device: nothing read back
                if step % args.log_every == 0:
                    log.step(step)
                stop, save = signals.poll()  # a stop signal or the timer, agreed by all ranks
                if save:
                    ckpt.save(epoch, batch, step, meter)
                if stop:
                    raise signals.stopped(step, epoch, batch)
            record = {"epoch": epoch + 1, "step": step, **meter.epoch(global_batch),
                      **knn(model.backbone, epoch + 1)}
            batch = 0
            ckpt.save(epoch + 1, batch, step, meter, record)  # + backbone.pt, best.pt
            log.epoch(record)
    dist.cleanup()


if __name__ == "__main__":
    run_main(main)
