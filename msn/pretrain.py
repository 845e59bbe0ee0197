"""MSN pretraining (Masked Siamese Networks) of a torchvision Vision Transformer.

    python msn/pretrain.py --dataset cifar10 --batch-size 256               # one GPU (or CPU)
    torchrun --nproc_per_node 8 msn/pretrain.py --dataset imagefolder --data-dir ... \
        --arch vit_small --patch-size 16 --batch-size 128     # ViT-S/16, global batch 1024
    python msn/pretrain.py --output-dir runs/msn/<run> --resume auto         # continue a run
    python msn/pretrain.py --dataset synthetic --dev 256 --batch-size 32 --arch vit_tiny --depth 2 \
        --max-epochs 2 --num-neighbours 20                              # offline smoke run
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

import torch

from common import dist
from common.augment import View
from common.errors import run_main
from common.flags import (Epochs, FromRecipe, Parser, add_common_args, apply_recipe, at_least,
                          describe_run, parse, positive_float)
from common.knn import KnnMonitor
from common.loaders import knn_loaders, pretrain_loader
from common.progress import Progress
from common.runtime import resolve_runtime, tune_process
from common.train import autocast, backward_step
from msn.model import ARCHS, MSN, msn_loss, vit_config

# MSN runs stretch the LR, WD and EMA schedules over 1.25 x the run (msn src/msn_train.py)
HORIZON = 1.25

# the official ViT-S/16 values (configs/pretrain/msn_vits16.yaml): 800 epochs, AdamW peak lr
# 1e-3 (for a global batch of 1024, not rescaled), 15 warmup epochs, weight decay 0.04 -> 0.4.
# No reference trains MSN below 224 px: patch 4 at 32 px (8 x 8 tokens) and 8 at 64 px are
# extrapolations, as is the batch of 256 on one process
CIFAR = dict(arch="vit_small", patch_size=4, batch_size=256, max_epochs=800, learning_rate=1e-3,
             warmup_duration=Epochs(15), weight_decay=0.04)
RECIPES = {"cifar": CIFAR, "stl10": dict(CIFAR, patch_size=8),
           # 64 images per GPU (16 GPUs: the official global batch of 1024)
           "imagenet": dict(CIFAR, patch_size=16, batch_size=64)}


def get_args(argv=None):
    p = Parser(description="MSN pretraining")
    add_common_args(p, RECIPES, knn_temperature=0.1)
    g = p.add_argument_group("msn", "MSN flags (official ViT-S/16 values unless noted). The kNN "
                             "--temperature defaults to 0.1 here (lightly's CIFAR-10 benchmark)")
    a = g.add_argument
    a("--arch", choices=sorted(ARCHS), default=FromRecipe(RECIPES, "arch"), help="torchvision "
      "ViT: tiny 192-d, small 384-d, base 768-d; 12 blocks, MLP 4x")
    a("--patch-size", type=at_least(1), default=FromRecipe(RECIPES, "patch_size"),
      help="ViT patch size")
    a("--depth", type=at_least(1), default=None, help="transformer blocks; unset: the arch's 12 (a "
      "few make fast tests)")
    a("--focal-views", type=at_least(0), default=10, help="F small unmasked anchor crops per image")
    a("--focal-size", type=at_least(1), default=None, help="focal crop size; unset: 96/224 of "
      "--image-size rounded up to a patch multiple (96 at 224 px, 16 at 32 px)")
    a("--rand-scale", type=float, nargs=2, default=[0.3, 1.0], help="crop scale of the target "
      "and masked anchor views (two different crops at --image-size)")
    a("--focal-scale", type=float, nargs=2, default=[0.05, 0.3], help="focal crop scale")
    a("--color-jitter", type=float, default=0.5, help="colour jitter strength s: brightness, "
      "contrast, saturation 0.8 s, hue 0.2 s (lightly's default: 1.0)")
    a("--mask-ratio", type=float, default=0.15, help="fraction of patch tokens dropped from the "
      "anchor view (ViT-S/16: 0.15)")
    a("--mask-per-image", action="store_true", help="draw one mask per image (lightly) instead "
      "of one per batch (official)")
    a("--hidden-dim", type=at_least(1), default=2048, help="projector hidden width")
    a("--projection-dim", type=at_least(1), default=256,
      help="projector output and prototype dim D")
    a("--num-prototypes", type=at_least(1), default=1024, help="K learnable prototypes")
    a("--tau", type=positive_float, default=0.1, help="anchor softmax temperature")
    a("--sharpen", type=positive_float, default=0.25,
      help="target sharpening T (target temperature tau x T)")
    a("--sinkhorn-iters", type=at_least(1), default=3, help="Sinkhorn iterations on the targets")
    a("--memax-weight", type=float, default=1.0, help="weight of the mean-entropy maximisation")
    a("--start-lr", type=float, default=2e-4, help="learning rate at the start of the warmup")
    a("--final-lr", type=float, default=1e-6, help="cosine floor, reached at 1.25 x the run")
    a("--final-weight-decay", type=float, default=0.4, help="weight decay after a cosine rise "
      "from --weight-decay over 1.25 x the run")
    a("--ema", type=float, default=0.996, help="target EMA momentum at step 0, rising linearly "
      "to 1 at 1.25 x the run")
    a("--clip-grad", type=at_least(0, float), default=3.0, help="max grad norm of encoder + "
      "projector (0: no clipping; the norm is logged either way)")
    # resolved once, in this order: command line, recipe, then the data and the machine
    args = parse(p, argv, "msn")  # a resumed run's own flags where the command line is silent
    apply_recipe(args, RECIPES)
    check(p, args)
    resolve_runtime(args)
    args.depth = args.depth or ARCHS[args.arch][1]
    # everything torchvision.models.VisionTransformer(**vit_config) needs to load backbone.pt
    args.vit_config = vit_config(args.arch, args.patch_size, args.image_size, args.depth)
    return args


def check(p, args) -> None:
    """The focal size's default (it depends on the image size) and one-line errors for
    impossible values."""
    size, patch = args.image_size, args.patch_size
    args.focal_size = args.focal_size or -(-size * 96 // (224 * patch)) * patch
    for name, value in (("--image-size", size), ("--focal-size", args.focal_size)):
        if value % patch:
            p.error(f"{name} {value} is not a multiple of --patch-size {patch}")
    if not 0 <= args.mask_ratio < 1:
        p.error(f"--mask-ratio must be in [0, 1) (got {args.mask_ratio})")
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2: the projector's BatchNorm needs it")
    for name in ("rand_scale", "focal_scale"):
        low, high = getattr(args, name)
        if not 0 < low <= high <= 1:
            p.error(f"--{name.replace('_', '-')} must satisfy 0 < min <= max <= 1")


def pretrain_views(args) -> list:
    """[target, masked anchor, F focal] as official (src/data_manager.py): colour jitter (0.8 s,
    0.8 s, 0.8 s, 0.2 s) p 0.8, gray 0.2, flip; blur p 0.5 only for the imagenet recipe (none
    at small sizes, as lightly's CIFAR benchmarks). Target and anchor are two independent crops
    of the same recipe."""
    norm, s = (args.mean, args.std), args.color_jitter
    colour = dict(jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=0.8, gray_p=0.2,
                  blur_p=0.5 if args.recipe == "imagenet" else 0.0)
    rand = View(args.image_size, *norm, scale=tuple(args.rand_scale), **colour)
    focal = View(args.focal_size, *norm, scale=tuple(args.focal_scale), **colour)
    return [rand, rand] + [focal] * args.focal_views


def schedules(step: int, total: int, warmup: int, args) -> tuple:
    """(lr, weight decay, EMA momentum) at `step`, pure functions of the step as official
    (msn src/utils.py WarmupCosineSchedule / CosineWDSchedule, src/msn_train.py): the LR warms up
    linearly from --start-lr, then all three follow 1.25 x `total` steps, never reaching their
    end values. The official schedulers step before use, so step s runs with their count s + 1."""
    horizon, s = int(HORIZON * total), step + 1
    if s < warmup:
        lr = args.start_lr + s / warmup * (args.learning_rate - args.start_lr)
    else:
        cos = 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, horizon - warmup)))
        lr = max(args.final_lr, args.final_lr + (args.learning_rate - args.final_lr) * cos)
    start_wd, final_wd = args.weight_decay, args.final_weight_decay
    wd = final_wd + (start_wd - final_wd) * 0.5 * (1 + math.cos(math.pi * s / horizon))
    wd = min(wd, final_wd) if final_wd >= start_wd else max(wd, final_wd)
    momentum = args.ema + step * (1 - args.ema) / (HORIZON * total)
    return lr, wd, momentum


def param_groups(model: MSN) -> list:
    """AdamW groups as official init_opt: weight decay on weight matrices (and the ViT's class
    token, positional embedding), none on biases and norm parameters (1-D) nor prototypes."""
    online = [p for m in (model.encoder, model.projector) for p in m.parameters()]
    return [{"params": [p for p in online if p.ndim > 1], "decay": True},
            {"params": [p for p in online if p.ndim <= 1], "weight_decay": 0.0, "decay": False},
            {"params": [model.prototypes], "weight_decay": 0.0, "decay": False}]


def train_step(net, model, views, optimizer, scaler, schedule, args) -> dict:
    """One step: target + anchor forward, MSN loss, backward, clip, AdamW, target EMA.
    net: the (DDP/compiled) module to call; model: the plain module (prototypes, target)."""
    lr, wd, momentum = schedule
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group["decay"]:
            group["weight_decay"] = wd
    with autocast(args.precision, views[0].device):
        z, h = net(views, args.mask_ratio, args.mask_per_image)  # (V*B, D), (B, D)
    loss, logs = msn_loss(z, h, model.prototypes, args.tau, args.sharpen, args.sinkhorn_iters,
                          args.memax_weight)
    # clip the encoder and projector only, not the prototypes, as official
    online = [p for m in (model.encoder, model.projector) for p in m.parameters()]
    grad_norm = backward_step(loss, optimizer, scaler, online, args.clip_grad or math.inf)
    model.update_ema(momentum)
    out = {"loss": loss.detach(), **logs, "lr": lr, "weight_decay": wd, "ema": momentum}
    if scaler is None:  # fp16: steps with inf gradients are skipped by the scaler, not errors
        out["grad_norm"] = grad_norm
    return out


def main(argv=None):
    args = get_args(argv)
    d = dist.setup(args.device, args.dist_timeout)
    tune_process(args, d.rank)

    # ---- data: per image 1 target + 1 anchor at --image-size and F focal crops; kNN splits
    loader, make_views = pretrain_loader(args, pretrain_views(args), d)
    knn = KnnMonitor(knn_loaders(args, d), args.num_neighbours, args.temperature,
                     args.eval_every, args.max_epochs, d, args.precision)

    # ---- model, optimizer
    model = MSN(args.vit_config, args.hidden_dim, args.projection_dim,
                args.num_prototypes).to(d.device)
    net = dist.prepare_model(model, d)
    net = torch.compile(net) if args.compile else net
    optimizer = torch.optim.AdamW(param_groups(model), lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(d.device.type) if args.precision == "fp16" else None
    total = args.max_epochs * len(loader)
    warmup = int(args.warmup_duration * total)
    images, tokens = args.batch_size * d.world_size, (args.image_size // args.patch_size) ** 2
    dist.print0(describe_run(args))
    dist.print0(f"world size {d.world_size} | per process {args.batch_size} images x (2 x "
                f"{args.image_size} px + {args.focal_views} x {args.focal_size} px) | global "
                f"batch {images} images | {tokens} tokens, {int(tokens * (1 - args.mask_ratio))} "
                f"kept in the anchor | {len(loader)} steps/epoch | peak lr {args.learning_rate} "
                f"(not batch-scaled; official: global batch 1024) | {args.output_dir}")
    if args.num_prototypes > images:  # Sinkhorn spreads each batch evenly over the prototypes
        dist.print0(f"notice: --num-prototypes {args.num_prototypes} is more than the global "
                    f"batch ({images}): each batch's targets can reach at most {images} of them "
                    "(official: 1024 prototypes, global batch 1024)")

    # ---- train
    with Progress(method="msn", args=args, d=d, model=model, backbone=model.target_encoder,
                  optimizer=optimizer, scaler=scaler, loader=loader,
                  resume_from=args.resume) as progress:
        if progress.fresh:
            progress.untrained(knn(model.target_encoder, 0))
        while progress.epoch < args.max_epochs:
            for batch in progress.batches(loader):
                views, _ = make_views(batch)  # [target, anchor, focal_1 .. focal_F], (B, C, ., .)
                schedule = schedules(progress.step, total, warmup, args)  # lr, wd, EMA momentum
                out = train_step(net, model, views, optimizer, scaler, schedule, args)
                progress.step_done(out)
            progress.epoch_done(knn(model.target_encoder, progress.epoch + 1))
    dist.cleanup()


if __name__ == "__main__":
    run_main(main)
