"""NNCLR pretraining (Nearest-Neighbor Contrastive Learning of visual representations).

    python nnclr/pretrain.py --dataset cifar10 --batch-size 256           # one GPU (or CPU)
    torchrun --nproc_per_node 8 nnclr/pretrain.py --batch-size 32         # global batch 256
    python nnclr/pretrain.py --output-dir runs/nnclr/<run> --resume auto  # continue a run
    python nnclr/pretrain.py --dataset synthetic --max-epochs 2 --dev --queue-size 2048  # smoke
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
from common.flags import (add_common_args, at_least, by_recipe, cap_queue, fill_recipe, parse,
                          parser, positive, resolve_learning_rate)
from common.knn import KnnMonitor
from common.loaders import knn_loaders, pretrain_loader
from common.log import Meter, RunLog, describe_run, learning_rate_rule
from common.runtime import resolve_runtime, tune_process
from common.signals import Signals
from common.train import autocast, backward_step, warmup_cosine
from nnclr.model import NNCLR, nnclr_loss

# solo-learn's CIFAR recipe (scripts/pretrain/cifar/nnclr.yaml, solo/methods/base.py): batch
# 256, 1000 epochs, LARS 0.4 per 256 images (eta 0.02, clipped), 10 warmup epochs, wd 1e-5,
# temperature 0.2, support set 65536
CIFAR = dict(backbone="resnet18", batch_size=256, max_epochs=1000, learning_rate=None,
             base_learning_rate=0.4, warmup_epochs=10, weight_decay=1e-5, lars_eta=0.02,
             hidden_dim=2048, projection_dim=256, pred_hidden_dim=4096, queue_size=65536,
             tau=0.2)
RECIPES = {
    "cifar": CIFAR,
    "stl10": CIFAR,  # no reference trains NNCLR on STL-10: the CIFAR recipe at 64 px
    # solo-learn's ImageNet-100 recipe (scripts/pretrain/imagenet-100/nnclr.yaml): ResNet-18,
    # 64 images per GPU on 2 GPUs (global batch 128), LARS 0.4 per 256 images (eta 0.02,
    # clipped), wd 1e-5, 400 epochs, 10 warmup epochs, temperature 0.2, support set 65536;
    # the paper's own ImageNet run (ResNet-50, batch 4096, SimCLR's LARS at 0.3 per 256, wd
    # 1e-6, 1000 epochs, temperature 0.1, support set 98304) used another LARS than this one
    "imagenet": dict(CIFAR, batch_size=64, max_epochs=400),
}


def get_args(argv=None):
    p = parser("NNCLR pretraining")
    add_common_args(p, RECIPES, knn_temperature=0.1)
    g = p.add_argument_group("nnclr")
    add_resnet_args(g, RECIPES)
    a, recipe = g.add_argument, dict(default=argparse.SUPPRESS)
    a("--hidden-dim", type=at_least(1), **recipe,
      help=f"projector hidden width {by_recipe(RECIPES, 'hidden_dim')}")
    a("--projection-dim", type=at_least(1), **recipe, help="embedding dim D of the projector, "
      f"the predictor output and the support set {by_recipe(RECIPES, 'projection_dim')}")
    a("--pred-hidden-dim", type=at_least(1), **recipe,
      help=f"predictor hidden width {by_recipe(RECIPES, 'pred_hidden_dim')}")
    a("--queue-size", type=at_least(1), **recipe, help="support-set size K, a multiple of the "
      "global batch. Neighbours are random vectors for the first K / global-batch steps: a K "
      "that needs more than a tenth of the run (at least an epoch) is shrunk, with a notice "
      f"{by_recipe(RECIPES, 'queue_size')}")
    a("--tau", type=positive, **recipe, help="softmax temperature of the loss (paper 0.1). Not "
      "--temperature: that is the kNN monitor's (lightly's CIFAR-10 benchmark: 0.1) "
      f"{by_recipe(RECIPES, 'tau')}")
    a("--lars-eta", type=positive, **recipe, help="LARS trust coefficient (solo-learn's form); "
      "each weight matrix's LR is min(lr, eta x trust ratio) "
      f"{by_recipe(RECIPES, 'lars_eta')}")
    # resolved once, in this order: the command line (a resumed run's own flags where it is
    # silent), the recipe, then the data and the machine
    args = parse(p, argv, "nnclr", RECIPES)
    fill_recipe(args, RECIPES)
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2: BatchNorm and the contrastive loss need it")
    resolve_runtime(args)
    images = args.batch_size * dist.launched_world_size()
    resolve_learning_rate(p, args, images)  # solo-learn's linear scaling (solo/args/pretrain.py)
    if args.queue_size % images:
        p.error(f"--queue-size {args.queue_size} must be a multiple of the global batch "
                f"{images} (--batch-size {args.batch_size} x {images // args.batch_size} "
                f"processes), e.g. {max(1, round(args.queue_size / images)) * images}")
    limit, why = support_set_limit(args, images)
    args.queue_size = cap_queue(args.queue_size, limit, "--queue-size", why)
    args.stem = resolve_stem(args.stem, args.recipe)
    return args


def support_set_limit(args, images: int) -> tuple:
    """The largest support set whose random initial vectors are replaced within the first
    tenth of the run, or the first epoch if that is longer (one global batch of `images` per
    step): solo-learn's 65,536 on CIFAR-10 is replaced in 256 of 195,000 steps. Returns
    (limit, why) for cap_queue."""
    epoch = pretrain_images(args) // images  # steps
    steps = max(epoch, epoch * args.max_epochs // 10)
    return steps * images, f"would hold random vectors for more than {steps} steps (a tenth " \
        "of the run, at least an epoch)"


def pretrain_views(args) -> list:
    """Two asymmetric views (solo-learn asymmetric.yaml): crop (0.08, 1), bicubic, jitter
    (0.4, 0.4, 0.2, 0.1) p 0.8, gray 0.2, flip; solarise only view 2 (0.0 / 0.2); blur 1.0 / 0.1
    only for the imagenet recipe (solo-learn's ImageNet-100; none at 32-64 px)."""
    big = args.recipe == "imagenet"
    kw = dict(jitter=(0.4, 0.4, 0.2, 0.1), interpolation="bicubic")
    return [View(args.image_size, args.mean, args.std, blur_p=1.0 if big else 0.0, **kw),
            View(args.image_size, args.mean, args.std, blur_p=0.1 if big else 0.0,
                 solarize_p=0.2, **kw)]


class LARS(torch.optim.Optimizer):
    """LARS as solo-learn (solo/utils/lars.py, clip_lr and exclude_bias_n_norm on): a weight
    matrix (ndim > 1) steps with d = (g + wd w) min(1, eta ||w|| / (||g|| + wd ||w|| + eps) / lr),
    a 1-D parameter (bias, norm weight) with its plain gradient, no weight decay; then
    v = 0.9 v + d, w = w - lr v. A zero ||w|| or ||g|| leaves d = g. Each line is one fused op
    over all parameters (torch._foreach_*), as torch's own optimizers."""

    def __init__(self, params, lr: float, weight_decay: float, eta: float = 0.02,
                 eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, eta=eta, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            params = [w for w in group["params"] if w.grad is not None]
            matrices, vectors = [w for w in params if w.ndim > 1], [w for w in params if w.ndim < 2]
            grads = [w.grad for w in matrices]
            w_norm = torch.stack(torch._foreach_norm(matrices))  # (M,)
            g_norm = torch.stack(torch._foreach_norm(grads))
            trust = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
            # d = (g + wd w) x clipped trust / lr; where ||w|| = 0 that is g, where ||g|| = 0 it
            # must be g = 0
            scale = torch.where(w_norm > 0, torch.clamp(trust / lr, max=1.0), 1.0) * (g_norm > 0)
            d = list(torch._foreach_add(grads, matrices, alpha=wd))
            torch._foreach_mul_(d, list(scale.unbind()))
            momentum_buffers = [self.momentum_buffer(w) for w in matrices + vectors]
            torch._foreach_mul_(momentum_buffers, 0.9)
            torch._foreach_add_(momentum_buffers, d + [w.grad for w in vectors])
            torch._foreach_add_(matrices + vectors, momentum_buffers, alpha=-lr)

    def momentum_buffer(self, w):
        state = self.state[w]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(w)
        return state["momentum_buffer"]


def train_step(net, model, x1, x2, y, optimizer, scaler, lr, args, nn_accuracy) -> dict:
    """One step: both views forward, each projection's NN in the support set as it was before
    this step, the symmetric loss, backward, LARS, then the global batch's view-1 projections
    are enqueued. net: the (DDP/compiled) module to call; model: the plain module owning the
    support set. y: labels (B,), -1 when unknown; nn_accuracy: log the NN accuracy."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(args.precision, x1.device):
        z, p = net(x1, x2)  # (2, B, D) each
    idx, neighbours = model.nearest_neighbours(z.float())  # (2, B), (2, B, D)
    loss = nnclr_loss(neighbours, p, args.tau)
    backward_step(loss, optimizer, scaler)
    out = {"loss": loss.detach(), "lr": lr}
    if nn_accuracy:  # share of view-1 queries whose neighbour carries their label (solo-learn)
        out["nn_acc"] = (model.queue_labels[idx[0]] == y).float().mean()
    model.enqueue(dist.gather(z[0].detach().float()), dist.gather(y))  # same queue on all ranks
    return out


def main(argv=None):
    args = get_args(argv)
    d = dist.setup(args.device, args.dist_timeout)
    tune_process(args, d.rank)

    # ---- data: B images x 2 asymmetric views per process and step; the kNN monitor's splits
    loader, make_views = pretrain_loader(args, d), BatchViews(pretrain_views(args), d.device)
    knn_splits = knn_loaders(args, d)
    knn = KnnMonitor(knn_splits, args.num_neighbours, args.temperature, args.eval_every,
                     args.max_epochs, d, args.precision)
    # NN accuracy needs every pretraining image labelled: not STL-10's train+unlabeled split,
    # not a flat image folder (no kNN splits either)
    nn_accuracy = knn_splits is not None and args.dataset != "stl10"

    # ---- model, optimizer
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = NNCLR(args.backbone, args.stem, args.image_size, args.hidden_dim,
                  args.projection_dim, args.pred_hidden_dim, args.queue_size)
    model = model.to(d.device, memory_format=memory_format)
    net = dist.prepare_model(model, d)
    net = torch.compile(net) if args.compile else net
    optimizer = LARS(model.parameters(), args.learning_rate, args.weight_decay, args.lars_eta)
    scaler = torch.amp.GradScaler(d.device.type) if args.precision == "fp16" else None
    total = args.max_epochs * len(loader)
    warmup = int(args.warmup_duration * total)
    global_batch = args.batch_size * d.world_size
    dist.print0(describe_run(args))
    dist.print0(f"world size {d.world_size} | per process {args.batch_size} images x 2 views | "
                f"global {global_batch} images per step | {len(loader)} steps/epoch | peak lr "
                f"{args.learning_rate:g} ({learning_rate_rule(args, global_batch)}) | support "
                f"set {args.queue_size} = {args.queue_size // global_batch} steps of random "
                f"vectors before it is full | {args.output_dir}")

    # ---- train, from where last.pt stopped: epoch, batches of it done, global step
    ckpt = Checkpoint("nnclr", args, d, model, model.backbone, optimizer, scaler,
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
                (x1, x2), _, y = make_views(images)  # (B, C, H, W) x 2, labels (B,)
                x1, x2 = (x.contiguous(memory_format=memory_format) for x in (x1, x2))
                lr = warmup_cosine(step, total, warmup, args.learning_rate)
                out = train_step(net, model, x1, x2, y, optimizer, scaler, lr, args,
                                 nn_accuracy)
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
