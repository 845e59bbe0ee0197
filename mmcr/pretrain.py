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
from common.errors import run_main
from common.flags import (Epochs, FromRecipe, Parser, add_common_args, apply_recipe, at_least,
                          describe_run, learning_rate_rule, parse, positive_float,
                          resolve_learning_rate)
from common.knn import KnnMonitor
from common.loaders import knn_loaders, pretrain_loader
from common.progress import Progress
from common.runtime import resolve_runtime, tune_process
from common.train import autocast, backward_step, warmup_cosine
from mmcr.model import MMCR, mmcr_loss

# the MMCR playground (bartoszzuk/mmcr): 64 images x 16 views, Adam 1e-3, 10% warmup then
# cosine, 500 epochs; the projector and views of the official CIFAR/STL code (mmcr/cifar_stl)
CIFAR = dict(backbone="resnet18", batch_size=64, num_views=16, max_epochs=500,
             optimizer="adam", learning_rate=1e-3, base_learning_rate=None, warmup_duration=0.1,
             final_lr_ratio=0.0, weight_decay=1e-6, lars_eta=1e-3, hidden_dim=[512],
             projection_dim=128, ema=None, zero_init_residual=False)
RECIPES = {
    "cifar": CIFAR,
    "stl10": CIFAR,  # with the official STL-10 views (colour before the crop)
    # official ImageNet at HEAD (ThomasYerxa/mmcr fafd3a9: pretrain_imagenet.py,
    # mmcr/imagenet/train.py): ResNet-50, 2 views, LARS 0.6 per 256 images, 10 warmup epochs
    # then cosine to 0.001 x peak, 100 epochs, momentum branch 0.99, projector 8192-8192-512,
    # zero-init residuals; 128 images per GPU (16 GPUs: the official global batch of 2048).
    # (the earlier official defaults, 287db45: --num-views 8 --base-learning-rate 0.8)
    "imagenet": dict(backbone="resnet50", batch_size=128, num_views=2, max_epochs=100,
                     optimizer="lars", learning_rate=None, base_learning_rate=0.6,
                     warmup_duration=Epochs(10), final_lr_ratio=0.001, weight_decay=1e-6,
                     lars_eta=1e-3, hidden_dim=[8192, 8192], projection_dim=512,
                     ema=0.99, zero_init_residual=True),
}


def ema_or_off(text: str):
    """--ema: a float, or 'off' for no momentum branch."""
    return None if text == "off" else float(text)


def get_args(argv=None):
    p = Parser(description="MMCR pretraining", renamed={"--momentum-tau": "--ema"})
    add_common_args(p, RECIPES, knn_temperature=0.5)
    g = p.add_argument_group("mmcr")
    add_resnet_args(g, RECIPES)
    recipe = lambda key: FromRecipe(RECIPES, key)  # noqa: E731
    g.add_argument("--num-views", type=at_least(2), default=recipe("num_views"),
                   help="views per image (official: CIFAR 40, ImageNet 2); memory grows with "
                   "batch x views")
    g.add_argument("--optimizer", choices=["adam", "lars"], default=recipe("optimizer"),
                   help="adam (official CIFAR/STL) or LARS with momentum 0.9, 1-D parameters "
                   "excluded (official ImageNet)")
    g.add_argument("--final-lr-ratio", type=at_least(0, float), default=recipe("final_lr_ratio"),
                   help="cosine decay ends at this fraction of the peak lr")
    g.add_argument("--lars-eta", type=positive_float, default=recipe("lars_eta"),
                   help="LARS trust coefficient")
    g.add_argument("--hidden-dim", type=at_least(1), nargs="+", default=recipe("hidden_dim"),
                   help="projector hidden widths (Linear-BN-ReLU each)")
    g.add_argument("--projection-dim", type=at_least(1), default=recipe("projection_dim"),
                   help="embedding dim D")
    g.add_argument("--lmbda", type=float, default=0.0, help="weight of the local nuclear-norm "
                   "term (official default 0)")
    g.add_argument("--ema", type=ema_or_off, default=recipe("ema"), help="momentum of the EMA "
                   "of the momentum branch (constant), or 'off' for none")
    g.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction,
                   default=recipe("zero_init_residual"),
                   help="zero-initialise the last BN of each residual block")
    # resolved once, in this order: command line, recipe, then the data and the machine
    args = parse(p, argv, "mmcr")  # a resumed run's own flags where the command line is silent
    apply_recipe(args, RECIPES)
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2: BatchNorm and the centroid matrix need it")
    resolve_runtime(args)
    resolve_learning_rate(args, args.batch_size * dist.launched_world_size())
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
    loss, logs = mmcr_loss(z, z_momentum, args.lmbda)
    backward_step(loss, optimizer, scaler)
    if args.ema is not None:
        model.update_ema(args.ema)
    return {"loss": loss.detach(), **logs, "lr": lr}


class LARS(torch.optim.Optimizer):
    """LARS as the official ImageNet code (mmcr/imagenet/misc.py, Barlow Twins' form): a weight
    matrix (ndim > 1) steps with d = (g + wd w) eta ||w|| / ||g + wd w||, a 1-D parameter (bias,
    norm weight) with its plain gradient, no weight decay; then v = 0.9 v + d, w = w - lr v.
    A zero ||w|| or ||g + wd w|| leaves g + wd w unscaled."""

    def __init__(self, params, lr: float, weight_decay: float, eta: float):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                d = w.grad
                if w.ndim > 1:
                    d = d + group["weight_decay"] * w
                    w_norm, d_norm = w.norm(), d.norm()
                    trust = group["eta"] * w_norm / d_norm
                    d = torch.where((w_norm > 0) & (d_norm > 0), d * trust, d)
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                buf = state["momentum_buffer"]
                w.add_(buf.mul_(0.9).add_(d), alpha=-group["lr"])


def make_optimizer(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    return LARS(params, args.learning_rate, args.weight_decay, args.lars_eta)


def main(argv=None):
    args = get_args(argv)
    d = dist.setup(args.device, args.dist_timeout)
    tune_process(args, d.rank)

    # ---- data: B images x V views per process and step; the kNN monitor's splits
    loader, make_views = pretrain_loader(args, pretrain_views(args), d)
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
    images = args.batch_size * d.world_size
    dist.print0(describe_run(args))
    dist.print0(f"world size {d.world_size} | per process {args.batch_size} images x "
                f"{args.num_views} views = {args.batch_size * args.num_views} crops | global "
                f"{images} images, {images * args.num_views} crops per step | {len(loader)} "
                f"steps/epoch | {args.optimizer}, peak lr {args.learning_rate:g} "
                f"({learning_rate_rule(args, images)}) | {args.output_dir}")

    # ---- train
    with Progress(method="mmcr", args=args, d=d, model=model, backbone=model.backbone,
                  optimizer=optimizer, scaler=scaler, loader=loader,
                  resume_from=args.resume) as progress:
        if progress.fresh:
            progress.untrained(knn(model.backbone, 0))
        while progress.epoch < args.max_epochs:
            for batch in progress.batches(loader):
                views, _ = make_views(batch)  # V tensors of (B, C, H, W), on the device
                x = torch.stack(views, 1).flatten(0, 1)  # (B*V, C, H, W), an image's views together
                x = x.contiguous(memory_format=memory_format)
                lr = warmup_cosine(progress.step, total, warmup, args.learning_rate,
                                   args.final_lr_ratio * args.learning_rate)
                out = train_step(net, model, x, optimizer, scaler, lr, args)
                progress.step_done(out)
            progress.epoch_done(knn(model.backbone, progress.epoch + 1))
    dist.cleanup()


if __name__ == "__main__":
    run_main(main)
