"""MSN pretraining (Masked Siamese Networks) of a torchvision Vision Transformer.

    python msn/pretrain.py --dataset cifar10 --batch-size 256               # one GPU (or CPU)
    torchrun --nproc_per_node 8 msn/pretrain.py --dataset imagefolder --data-dir ... \
        --arch vit_small --patch-size 16 --batch-size 128     # ViT-S/16, global batch 1024
    python msn/pretrain.py --output-dir runs/msn/<run> --resume auto         # continue a run
    python msn/pretrain.py --dataset synthetic --dev 256 --batch-size 32 --arch vit_tiny --depth 2 \
        --max-epochs 2 --num-neighbours 20                              # offline smoke run
"""
import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

import torch

from common import dist
from common.augment import View
from common.checkpoint import Checkpoint
from common.device_views import BatchViews
from common.errors import run_main
from common.flags import (add_common_args, at_least, by_recipe, fill_recipe, fraction, momentum,
                          number, parse, parser, positive)
from common.knn import KnnMonitor
from common.loaders import knn_loaders, pretrain_loader
from common.log import Meter, RunLog, describe_run
from common.runtime import resolve_runtime, tune_process
from common.signals import Signals
from common.train import autocast, backward_step
from msn.model import ARCHS, MSN, msn_loss, vit_config

# MSN runs stretch the LR, WD and EMA schedules over 1.25 x the run (msn src/msn_train.py)
HORIZON = 1.25

# the official ViT-S/16 values (configs/pretrain/msn_vits16.yaml): 800 epochs, AdamW peak lr
# 1e-3 (for a global batch of 1024, not rescaled), 15 warmup epochs, weight decay 0.04 -> 0.4.
# No reference trains MSN below 224 px: patch 4 at 32 px (8 x 8 tokens) and 8 at 64 px are
# extrapolations, as is the batch of 256 on one process
CIFAR = dict(arch="vit_small", patch_size=4, batch_size=256, max_epochs=800, learning_rate=1e-3,
             warmup_epochs=15, weight_decay=0.04)
RECIPES = {"cifar": CIFAR, "stl10": dict(CIFAR, patch_size=8),
           # 64 images per GPU (16 GPUs: the official global batch of 1024)
           "imagenet": dict(CIFAR, patch_size=16, batch_size=64)}


def get_args(argv=None):
    p = parser("MSN pretraining")
    add_common_args(p, RECIPES, knn_temperature=0.1)
    g = p.add_argument_group("msn", "MSN flags (official ViT-S/16 values unless noted). The kNN "
                             "--temperature defaults to 0.1 here (lightly's CIFAR-10 benchmark)")
    a, recipe = g.add_argument, dict(default=argparse.SUPPRESS)
    a("--arch", choices=sorted(ARCHS), **recipe, help="torchvision ViT: tiny 192-d, small "
      f"384-d, base 768-d; 12 blocks, MLP 4x {by_recipe(RECIPES, 'arch')}")
    a("--patch-size", type=at_least(1), **recipe,
      help=f"ViT patch size {by_recipe(RECIPES, 'patch_size')}")
    a("--depth", type=at_least(1), default=None, help="transformer blocks; unset: the arch's 12 (a "
      "few make fast tests)")
    a("--focal-views", type=at_least(0), default=10, help="F small unmasked anchor crops per image")
    a("--focal-size", type=at_least(1), default=None, help="focal crop size; unset: 96/224 of "
      "--image-size rounded up to a patch multiple (96 at 224 px, 16 at 32 px)")
    a("--rand-scale", type=number(low=0, high=1, open_low=True), nargs=2, default=[0.3, 1.0],
      help="crop scale of the target and masked anchor views (two different crops at "
      "--image-size)")
    a("--focal-scale", type=number(low=0, high=1, open_low=True), nargs=2,
      default=[0.05, 0.3], help="focal crop scale")
    a("--colour-jitter", type=at_least(0, float), default=0.5, help="colour jitter strength s: "
      "brightness, contrast, saturation 0.8 s, hue 0.2 s (lightly's default: 1.0)")
    a("--mask-ratio", type=number(low=0, high=1, open_high=True), default=0.15,
      help="fraction of patch tokens dropped from the anchor view (ViT-S/16: 0.15)")
    a("--mask-per-image", action="store_true", help="draw one mask per image (lightly) instead "
      "of one per batch (official)")
    a("--hidden-dim", type=at_least(1), default=2048, help="projector hidden width")
    a("--projection-dim", type=at_least(1), default=256,
      help="projector output and prototype dim D")
    a("--num-prototypes", type=at_least(1), default=1024, help="K learnable prototypes")
    a("--tau", type=positive, default=0.1, help="anchor softmax temperature")
    a("--sharpen", type=positive, default=0.25,
      help="target sharpening T (target temperature tau x T)")
    a("--sinkhorn-iters", type=at_least(1), default=3, help="Sinkhorn iterations on the targets")
    a("--memax-weight", type=at_least(0, float), default=1.0,
      help="weight of the mean-entropy maximisation")
    a("--start-lr-ratio", type=fraction, default=0.2, help="the warmup starts at this fraction "
      "of the peak lr (official: 2e-4 of 1e-3)")
    a("--final-lr-ratio", type=fraction, default=0.001, help="the cosine floor, reached at 1.25 "
      "x the run, as a fraction of the peak lr (official: 1e-6 of 1e-3)")
    a("--final-weight-decay", type=at_least(0, float), default=0.4, help="weight decay after a "
      "cosine rise from --weight-decay over 1.25 x the run")
    a("--ema-start", type=momentum, default=0.996, help="EMA momentum of the target encoder at "
      "step 0, rising linearly to 1 at 1.25 x the run")
    a("--clip-grad", type=at_least(0, float), default=3.0, help="max grad norm of encoder + "
      "projector (0: no clipping; the norm is logged either way)")
    # resolved once, in this order: the command line (a resumed run's own flags where it is
    # silent), the recipe, then the data and the machine
    args = parse(p, argv, "msn", RECIPES)
    fill_recipe(args, RECIPES)
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
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2: the projector's BatchNorm needs it")
    for name in ("rand_scale", "focal_scale"):
        low, high = getattr(args, name)
        if low > high:
            p.error(f"--{name.replace('_', '-')} must give min <= max (got {low} {high})")


def pretrain_views(args) -> list:
    """[target, masked anchor, F focal] as official (src/data_manager.py): colour jitter (0.8 s,
    0.8 s, 0.8 s, 0.2 s) p 0.8, gray 0.2, flip; blur p 0.5 only for the imagenet recipe (none
    at small sizes, as lightly's CIFAR benchmarks). Target and anchor are two independent crops
    of the same recipe."""
    norm, s = (args.mean, args.std), args.colour_jitter
    colour = dict(jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=0.8, gray_p=0.2,
                  blur_p=0.5 if args.recipe == "imagenet" else 0.0)
    rand = View(args.image_size, *norm, scale=tuple(args.rand_scale), **colour)
    focal = View(args.focal_size, *norm, scale=tuple(args.focal_scale), **colour)
    return [rand, rand] + [focal] * args.focal_views


def schedules(step: int, total: int, warmup: int, args) -> tuple:
    """(lr, weight decay, EMA momentum) at `step`, pure functions of the step as official
    (msn src/utils.py WarmupCosineSchedule / CosineWDSchedule, src/msn_train.py): the LR warms up
    linearly from its start, then all three follow 1.25 x `total` steps, never reaching their
    end values. The official schedulers step before use, so step s runs with their count s + 1."""
    horizon, s = int(HORIZON * total), step + 1
    peak = args.learning_rate
    start, final = args.start_lr_ratio * peak, args.final_lr_ratio * peak
    if s < warmup:
        lr = start + s / warmup * (peak - start)
    else:
        cos = 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, horizon - warmup)))
        lr = max(final, final + (peak - final) * cos)
    start_wd, final_wd = args.weight_decay, args.final_weight_decay
    wd = final_wd + (start_wd - final_wd) * 0.5 * (1 + math.cos(math.pi * s / horizon))
    wd = min(wd, final_wd) if final_wd >= start_wd else max(wd, final_wd)
    ema = args.ema_start + step * (1 - args.ema_start) / (HORIZON * total)
    return lr, wd, ema


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
    lr, wd, ema = schedule
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
    model.update_ema(ema)
    out = {"loss": loss.detach(), **logs, "lr": lr, "weight_decay": wd, "ema": ema}
    if scaler is None:  # fp16: steps with inf gradients are skipped by the scaler, not errors
        out["grad_norm"] = grad_norm
    return out


def main(argv=None):
    args = get_args(argv)
    d = dist.setup(args.device, args.dist_timeout)
    tune_process(args, d.rank)

    # ---- data: per image 1 target + 1 anchor at --image-size and F focal crops; kNN splits
    loader, make_views = pretrain_loader(args, d), BatchViews(pretrain_views(args), d.device)
    knn = KnnMonitor(knn_loaders(args, d), args.num_neighbours, args.temperature,
                     args.eval_every, args.max_epochs, d, args.precision)

    # ---- model, optimizer
    model = MSN(args.vit_config, args.hidden_dim, args.projection_dim,
                args.num_prototypes).to(d.device)
    net = dist.prepare_model(model, d)
    net = torch.compile(net) if args.compile else net
    optimizer = torch.optim.AdamW(param_groups(model), lr=args.learning_rate,
                                  weight_decay=args.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(d.device.type) if args.precision == "fp16" else None
    total = args.max_epochs * len(loader)
    warmup = int(args.warmup_duration * total)
    global_batch, tokens = args.batch_size * d.world_size, (args.image_size // args.patch_size) ** 2
    dist.print0(describe_run(args))
    dist.print0(f"world size {d.world_size} | per process {args.batch_size} images x (2 x "
                f"{args.image_size} px + {args.focal_views} x {args.focal_size} px) | global "
                f"batch {global_batch} images | {tokens} tokens, "
                f"{int(tokens * (1 - args.mask_ratio))} kept in the anchor | {len(loader)} "
                f"steps/epoch | peak lr {args.learning_rate} (not batch-scaled; official: "
                f"global batch 1024) | {args.output_dir}")
    if args.num_prototypes > global_batch:  # Sinkhorn spreads each batch evenly over them
        dist.print0(f"notice: --num-prototypes {args.num_prototypes} is more than the global "
                    f"batch ({global_batch}): each batch's targets can reach at most "
                    f"{global_batch} of them (official: 1024 prototypes, global batch 1024)")

    # ---- train, from where last.pt stopped: epoch, batches of it done, global step
    ckpt = Checkpoint("msn", args, d, model, model.target_encoder, optimizer, scaler,
                      loader.generator)
    meter = Meter(d.device)
    epoch, batch, step = ckpt.resume(meter)  # (0, 0, 0) for a new run
    if epoch == args.max_epochs:
        return  # finished: resume() said so
    with Signals(args.checkpoint_every, d) as signals, \
            RunLog(args, d, args.resume is None, meter) as log:
        if step == 0:
            log.epoch({"epoch": 0, "step": 0, **knn(model.target_encoder, 0)})  # untrained
        for epoch in range(epoch, args.max_epochs):
            loader.sampler.set_epoch(epoch, skip=batch * args.batch_size)  # the rest of it
            for images in meter.timed(log.bar(loader, epoch, batch)):
                views, _, _ = make_views(images)  # [target, anchor, focal_1 .. focal_F]
                schedule = schedules(step, total, warmup, args)  # lr, wd, EMA momentum
                out = train_step(net, model, views, optimizer, scaler, schedule, args)
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
                      **knn(model.target_encoder, epoch + 1)}
            batch = 0
            ckpt.save(epoch + 1, batch, step, meter, record)  # + backbone.pt, best.pt
            log.epoch(record)
    dist.cleanup()


if __name__ == "__main__":
    run_main(main)
