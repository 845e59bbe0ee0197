"""MMCR pretraining (Maximum Manifold Capacity Representations).

    python mmcr/pretrain.py --batch-size 64 --num-views 16            # one GPU (or CPU)
    torchrun --nproc_per_node 8 mmcr/pretrain.py --batch-size 64 --num-views 16
    python mmcr/pretrain.py --output-dir runs/mmcr/<run> --resume auto  # continue a run
    python mmcr/pretrain.py --dataset synthetic --max-epochs 2 --dev    # offline smoke run
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
from common.device_views import BatchViews
from common.errors import run_main
from common.flags import (add_common_args, at_least, by_recipe, fill_recipe, momentum, parse,
                          parser, positive, refuse_unused, resolve_learning_rate)
from common.knn import KnnMonitor
from common.loaders import knn_loaders, pretrain_loader
from common.log import Meter, RunLog, describe_run, learning_rate_rule
from common.runtime import resolve_runtime, tune_process
from common.signals import Signals
from common.train import autocast, backward_step, warmup_cosine
from mmcr.model import MMCR, mmcr_loss

# the MMCR playground (bartoszzuk/mmcr): 64 images x 16 views, Adam 1e-3, 10% warmup then
# cosine, 500 epochs; the projector and views of the official CIFAR/STL code (mmcr/cifar_stl)
CIFAR = dict(backbone="resnet18", batch_size=64, num_views=16, max_epochs=500,
             optimizer="adam", learning_rate=1e-3, base_learning_rate=None, warmup_duration=0.1,
             final_lr_ratio=0.0, weight_decay=1e-6, lars_eta=1e-3, hidden_dim=[512],
             projection_dim=128, ema=None, zero_init_residual=False, local_gradient=False)
RECIPES = {
    "cifar": CIFAR,
    "stl10": CIFAR,  # with the official STL-10 views (colour before the crop)
    # official ImageNet at HEAD (ThomasYerxa/mmcr fafd3a9: pretrain_imagenet.py,
    # mmcr/imagenet/train.py): ResNet-50, 2 views, LARS 0.6 per 256 images, 10 warmup epochs
    # then cosine to 0.001 x peak, 100 epochs, momentum branch 0.99, projector 8192-8192-512,
    # zero-init residuals, the loss's gradient through this rank's embeddings only
    # (mmcr/imagenet/loss_mmcr_momentum.py); 128 images per GPU (16 GPUs: the official global
    # batch of 2048). (the earlier official defaults, 287db45: --num-views 8
    # --base-learning-rate 0.8)
    "imagenet": dict(backbone="resnet50", batch_size=128, num_views=2, max_epochs=100,
                     optimizer="lars", learning_rate=None, base_learning_rate=0.6,
                     warmup_epochs=10, final_lr_ratio=0.001, weight_decay=1e-6,
                     lars_eta=1e-3, hidden_dim=[8192, 8192], projection_dim=512,
                     ema=0.99, zero_init_residual=True, local_gradient=True),
}


def ema_or_off(text: str):
    """--ema: an EMA momentum in [0, 1), or 'off' for no momentum branch."""
    return None if text == "off" else momentum(text)


def get_args(argv=None):
    p = parser("MMCR pretraining")
    add_common_args(p, RECIPES, knn_temperature=0.5)
    g = p.add_argument_group("mmcr")
    add_resnet_args(g, RECIPES)
    a, recipe = g.add_argument, dict(default=argparse.SUPPRESS)
    a("--num-views", type=at_least(2), **recipe, help="views per image (official: CIFAR 40, "
      f"ImageNet 2); memory grows with batch x views {by_recipe(RECIPES, 'num_views')}")
    a("--optimizer", choices=["adam", "lars"], **recipe, help="adam (official CIFAR/STL) or "
      "LARS with momentum 0.9, 1-D parameters excluded (official ImageNet) "
      f"{by_recipe(RECIPES, 'optimizer')}")
    a("--final-lr-ratio", type=at_least(0, float), **recipe, help="the cosine decay ends at "
      f"this fraction of the peak lr {by_recipe(RECIPES, 'final_lr_ratio')}")
    a("--lars-eta", type=positive, **recipe, help="LARS trust coefficient (--optimizer lars) "
      f"{by_recipe(RECIPES, 'lars_eta')}")
    a("--hidden-dim", type=at_least(1), nargs="+", **recipe, help="projector hidden widths "
      f"(Linear-BN-ReLU each) {by_recipe(RECIPES, 'hidden_dim')}")
    a("--projection-dim", type=at_least(1), **recipe,
      help=f"embedding dim D {by_recipe(RECIPES, 'projection_dim')}")
    a("--ema", type=ema_or_off, **recipe, help="EMA momentum of the momentum branch (constant), "
      f"or 'off' for none {by_recipe(RECIPES, 'ema', none='off')}")
    a("--zero-init-residual", action=argparse.BooleanOptionalAction, **recipe,
      help="zero-initialise the last BN of each residual block "
      f"{by_recipe(RECIPES, 'zero_init_residual')}")
    a("--local-gradient", action=argparse.BooleanOptionalAction, **recipe, help="under "
      "torchrun, the loss's gradient flows only through this rank's embeddings, the others' "
      "gathered without it (the official ImageNet code): each step is 1/world size of the "
      "global loss's gradient (LARS rescales weight matrices; the 1-D parameters step that "
      "much shorter); --no-local-gradient: the global loss's own gradient "
      f"{by_recipe(RECIPES, 'local_gradient')}")
    a("--lmbda", type=at_least(0, float), default=0.0, help="weight of the local nuclear-norm "
      "term (official default 0)")
    # resolved once, in this order: the command line (a resumed run's own flags where it is
    # silent), the recipe, then the data and the machine
    args = parse(p, argv, "mmcr", RECIPES)
    fill_recipe(args, RECIPES)
    refuse_unused(args, {"lars_eta": args.optimizer != "lars" and "it is LARS' trust "
                         "coefficient, and --optimizer is adam"})
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2: BatchNorm and the centroid matrix need it")
    resolve_runtime(args)
    resolve_learning_rate(p, args, args.batch_size * dist.launched_world_size())
    args.stem = resolve_stem(args.stem, args.recipe)
    return args


def pretrain_views(args) -> list:
    """Independent random views: the official CIFAR recipe (mmcr/cifar_stl/data.py); STL-10 with
    colour before the crop; the imagenet recipe alternates the two Barlow Twins view types
    (mmcr/imagenet/data.py)."""
    size, norm = args.image_size, (args.mean, args.std)
    if args.recipe == "stl10":
        return [View(size, *norm, scale=(0.2, 1.0), gray_p=0.1, colour_first=True,
                     interpolation="bicubic")] * args.num_views
    if args.recipe == "imagenet":
        kw = dict(jitter=(0.4, 0.4, 0.2, 0.1), interpolation="bicubic")
        pair = [View(size, *norm, blur_p=1.0, **kw),
                View(size, *norm, blur_p=0.1, solarize_p=0.2, **kw)]
        return [pair[v % 2] for v in range(args.num_views)]
    return [View(size, *norm)] * args.num_views


def train_step(net, model, x, optimizer, scaler, lr, args) -> dict:
    """One step: all B x V views in one forward, MMCR loss, backward, optimizer step, EMA of
    the momentum branch. net: the (DDP/compiled) module to call; model: the plain module owning
    the momentum copy."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(args.precision, x.device):
        z, z_momentum = net(x, args.num_views)
    loss, logs = mmcr_loss(z, z_momentum, args.lmbda, args.local_gradient)
    backward_step(loss, optimizer, scaler)
    if args.ema is not None:
        model.update_ema(args.ema)
    return {"loss": loss.detach(), **logs, "lr": lr}


class LARS(torch.optim.Optimizer):
    """LARS as the official ImageNet code (mmcr/imagenet/misc.py, Barlow Twins' form): a weight
    matrix (ndim > 1) steps with d = (g + wd w) eta ||w|| / ||g + wd w||, a 1-D parameter (bias,
    norm weight) with its plain gradient, no weight decay; then v = 0.9 v + d, w = w - lr v.
    A zero ||w|| or ||g + wd w|| leaves g + wd w unscaled. Each line is one fused op over all
    parameters (torch._foreach_*), as torch's own optimizers."""

    def __init__(self, params, lr: float, weight_decay: float, eta: float):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [w for w in group["params"] if w.grad is not None]
            matrices, vectors = [w for w in params if w.ndim > 1], [w for w in params if w.ndim < 2]
            d = list(torch._foreach_add([w.grad for w in matrices], matrices,
                                        alpha=group["weight_decay"]))
            w_norm = torch.stack(torch._foreach_norm(matrices))  # (M,)
            d_norm = torch.stack(torch._foreach_norm(d))
            trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, 1.0)
            torch._foreach_mul_(d, list(trust.unbind()))
            momentum_buffers = [self.momentum_buffer(w) for w in matrices + vectors]
            torch._foreach_mul_(momentum_buffers, 0.9)
            torch._foreach_add_(momentum_buffers, d + [w.grad for w in vectors])
            torch._foreach_add_(matrices + vectors, momentum_buffers, alpha=-group["lr"])

    def momentum_buffer(self, w):
        state = self.state[w]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(w)
        return state["momentum_buffer"]


def make_optimizer(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adam":  # fused: one kernel for all parameters
        return torch.optim.Adam(params, lr=args.learning_rate, weight_decay=args.weight_decay,
                                fused=True)
    return LARS(params, args.learning_rate, args.weight_decay, args.lars_eta)


def main(argv=None):
    args = get_args(argv)
    d = dist.setup(args.device, args.dist_timeout)
    tune_process(args, d.rank)

    # ---- data: B images x V views per process and step; the kNN monitor's splits
    loader, make_views = pretrain_loader(args, d), BatchViews(pretrain_views(args), d.device)
    knn = KnnMonitor(knn_loaders(args, d), args.num_neighbours, args.temperature,
                     args.eval_every, args.max_epochs, d, args.precision)

    # ---- model, optimizer
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = MMCR(args.backbone, args.stem, args.image_size, args.hidden_dim, args.projection_dim,
                 args.ema is not None, args.zero_init_residual)
    model = model.to(d.device, memory_format=memory_format)
    net = dist.prepare_model(model, d)
    net = torch.compile(net) if args.compile else net
    optimizer = make_optimizer(model, args)
    scaler = torch.amp.GradScaler(d.device.type) if args.precision == "fp16" else None
    total = args.max_epochs * len(loader)
    warmup = int(args.warmup_duration * total)
    global_batch = args.batch_size * d.world_size
    dist.print0(describe_run(args))
    dist.print0(f"world size {d.world_size} | per process {args.batch_size} images x "
                f"{args.num_views} views = {args.batch_size * args.num_views} crops | global "
                f"{global_batch} images, {global_batch * args.num_views} crops per step | "
                f"{len(loader)} steps/epoch | {args.optimizer}, peak lr {args.learning_rate:g} "
                f"({learning_rate_rule(args, global_batch)}) | {args.output_dir}")

    # ---- train, from where last.pt stopped: epoch, batches of it done, global step
    ckpt = Checkpoint("mmcr", args, d, model, model.backbone, optimizer, scaler, loader.generator)
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
                views, _, _ = make_views(images)  # V x (B, C, H, W) on the device
                x = torch.stack(views, 1).flatten(0, 1)  # (B*V, C, H, W), an image's views together
                x = x.contiguous(memory_format=memory_format)
                lr = warmup_cosine(step, total, warmup, args.learning_rate,
                                   args.final_lr_ratio * args.learning_rate)
                out = train_step(net, model, x, optimizer, scaler, lr, args)
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
