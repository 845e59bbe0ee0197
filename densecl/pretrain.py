"""DenseCL pretraining (Dense Contrastive Learning, a MoCo-v2 global loss plus a dense one).

    python densecl/pretrain.py --dataset cifar10 --batch-size 128          # one GPU (or CPU)
    torchrun --nproc_per_node 8 densecl/pretrain.py --dataset imagefolder --data-dir ... \\
        --backbone resnet50 --batch-size 32 --learning-rate 0.015 --weight-decay 1e-4 --ema 0.999
    python densecl/pretrain.py --output-dir runs/densecl/<run> --resume auto  # continue a run
    python densecl/pretrain.py --dataset synthetic --max-epochs 2 --dev      # offline smoke run
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

import torch

from common import dist
from common.augment import MultiView, View
from common.backbone import add_resnet_args, resolve_stem
from common.checkpoint import resolve_output_dir, resume_path
from common.data import dataset_info, pretrain_data
from common.loop import fit
from common.recipe import apply_recipe, describe_recipe, use_recipes
from common.train import (Parser, UserError, add_common_args, at_least, autocast, backward_step,
                          cap_queue, configure_runtime, positive_float, run_main, seed_everything,
                          warmup_cosine)
from densecl.model import DenseCL, densecl_loss, match_accuracy, match_locations

LR_BATCH = 128  # --learning-rate is per 128 images (lightly MoCo CIFAR-10 benchmark)

# lightly's MoCo CIFAR-10 benchmark (docs/source/getting_started/benchmarks): batch 128, SGD
# 0.06 per 128 images, wd 5e-4, EMA 0.99, queue 4096 (the official 65536 exceeds CIFAR-10)
CIFAR = dict(backbone="resnet18", batch_size=128, max_epochs=200, learning_rate=0.06,
             warmup_duration=0.0, weight_decay=5e-4, ema=0.99, queue_size=4096)
RECIPES = {
    "cifar": CIFAR,
    "stl10": CIFAR,  # no reference trains DenseCL on STL-10: the CIFAR recipe at 64 px
    # official (configs/selfsup/densecl/densecl_imagenet_200ep.py): ResNet-50, SGD 0.03 per 256
    # images, wd 1e-4, EMA 0.999, queue 65536, 200 epochs, no warmup; 32 images per GPU
    # (8 GPUs: the official global batch of 256)
    "imagenet": dict(backbone="resnet50", batch_size=32, max_epochs=200, learning_rate=0.015,
                     warmup_duration=0.0, weight_decay=1e-4, ema=0.999, queue_size=65536),
}


def get_args(argv=None):
    p = Parser(description="DenseCL pretraining")
    add_common_args(p, knn_temperature=0.1, learning_rate_help="SGD learning rate per "
                    f"{LR_BATCH} images: peak = this x global batch / {LR_BATCH}")
    g = p.add_argument_group("densecl", "SGD (momentum 0.9) with peak lr = --learning-rate x "
                             f"global batch / {LR_BATCH} and cosine decay per step")
    add_resnet_args(g)
    g.add_argument("--tau", type=positive_float, default=0.2, help="InfoNCE temperature of "
                   "both losses (official 0.2)")
    g.add_argument("--dense-weight", type=float, default=0.5, help="lambda: loss = (1 - lambda)"
                   " global + lambda dense (official 0.5; 0 gives MoCo v2)")
    g.add_argument("--queue-size", type=at_least(1), help="length K of both key queues, a "
                   "multiple of the global batch and at most the training set (larger is "
                   "shrunk, with a notice)")
    g.add_argument("--ema", type=float, help="constant EMA of the momentum backbone and heads")
    g.add_argument("--bn-splits", type=at_least(1), default=None, help="BatchNorm groups per "
                   "process; the key batch is shuffled over all processes before the split. "
                   "Unset: 8 on one process (MoCo's CIFAR split BN; fewer if the batch is too "
                   "small), 1 under torchrun (official shuffle-BN)")
    g.add_argument("--hidden-dim", type=at_least(1), default=None, help="hidden width of both "
                   "heads (unset: the backbone width, as the official neck)")
    g.add_argument("--projection-dim", type=at_least(1), default=128, help="embedding dim D")
    use_recipes(p, RECIPES)
    args = p.parse_args(argv)
    apply_recipe(args, RECIPES)
    if not 0 <= args.dense_weight <= 1:
        p.error(f"--dense-weight must lie in [0, 1] (got {args.dense_weight})")
    if not 0 <= args.ema <= 1:
        p.error(f"--ema must lie in [0, 1] (got {args.ema})")
    args.stem = resolve_stem(args.stem, args.recipe)
    return args


def default_bn_splits(batch_size: int, world: int) -> int:
    """8 BN groups on one process (MoCo CIFAR demo), fewer when the batch is too small for
    groups of 2; 1 under torchrun, where each process is a group (official shuffle-BN)."""
    splits = 8 if world == 1 else 1
    while splits > 1 and (batch_size % splits or batch_size // splits < 2):
        splits //= 2
    return splits


def check_sizes(args, world: int) -> None:
    """Queue and BN-group sizes against the batch, before any data is loaded."""
    if args.batch_size % args.bn_splits or args.batch_size // args.bn_splits < 2:
        raise UserError(f"--batch-size {args.batch_size} must split into --bn-splits "
                        f"{args.bn_splits} groups of at least 2 images each")
    if args.queue_size % (args.batch_size * world):
        raise UserError(f"--queue-size {args.queue_size} must be a multiple of the global batch "
                        f"{args.batch_size * world} ({args.batch_size} x {world} processes)")


def view_transform(args, info) -> MultiView:
    """Two MoCo-v2 views (official DenseCL pipeline); Gaussian blur only for the imagenet recipe
    (none at 32 px, as lightly's CIFAR benchmarks). Boxes give the crop geometry for match_acc."""
    view = View(info.image_size, info.mean, info.std, scale=(0.2, 1.0),
                blur_p=0.5 if args.recipe == "imagenet" else 0.0)
    return MultiView([view, view], with_boxes=True)


def train_step(net, model, x_q, x_k, boxes, optimizer, scaler, lr, args) -> dict:
    """One step: EMA, forward (keys under shuffle-BN), matching, loss, backward, SGD, enqueue.
    net: the (DDP/compiled) module to call; model: the plain module owning EMA and queues.
    boxes (B, 2, 5): crop geometry of the two views, for the matching accuracy."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.update_momentum(args.ema)  # before the keys, as official forward_train
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
    configure_runtime(args, d.device)
    seed_everything(args.seed, d.rank)
    info = dataset_info(args)
    args.bn_splits = args.bn_splits or default_bn_splits(args.batch_size, d.world_size)
    check_sizes(args, d.world_size)
    out_dir = resolve_output_dir(args, "densecl")
    resume_from = resume_path(args, out_dir)

    # ---- data: B images x 2 views (+ crop boxes) per process and step
    data = pretrain_data(args, info, view_transform(args, info), d)
    images = args.batch_size * d.world_size
    args.queue_size = cap_queue(args.queue_size, len(data.loader) * images, "--queue-size")

    # ---- model, optimizer: SGD on the online backbone + neck only
    model = DenseCL(args.backbone, args.stem, args.image_size, args.hidden_dim,
                    args.projection_dim, args.queue_size, args.bn_splits).to(d.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net = dist.prepare_model(model, d, sync_bn=False)  # SyncBN would undo the shuffle-BN
    net = torch.compile(net) if args.compile else net
    peak_lr = args.learning_rate * images / LR_BATCH
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=peak_lr, momentum=0.9, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(d.device.type) if args.precision == "fp16" else None
    total = args.max_epochs * len(data.loader)
    warmup = int(args.warmup_duration * total)

    dist.print0("\n".join(f"  {k}: {v}" for k, v in sorted(vars(args).items())))
    dist.print0(describe_recipe(args))
    dist.print0(f"world size {d.world_size} | per process {args.batch_size} images x 2 views | "
                f"global {images} images per step | {len(data.loader)} steps/epoch | lr: base "
                f"{args.learning_rate} x {images}/{LR_BATCH} = {peak_lr:g} | queues "
                f"{args.queue_size} | BatchNorm: key batch shuffled over {images} images, "
                f"{args.bn_splits} group(s) of {args.batch_size // args.bn_splits} per process "
                f"| {out_dir}")

    # ---- train
    def step_fn(batch, step):
        (views, boxes), _ = batch  # 2 x (B, C, H, W), (B, 2, 5)
        x_q, x_k = (v.contiguous(memory_format=memory_format) for v in views)
        lr = warmup_cosine(step, total, warmup, peak_lr)
        return train_step(net, model, x_q, x_k, boxes, optimizer, scaler, lr, args)

    fit(method="densecl", args=args, d=d, model=model, optimizer=optimizer, scaler=scaler,
        step_fn=step_fn, data=data, backbone=model.backbone, out_dir=out_dir,
        resume_from=resume_from)
    dist.cleanup()


if __name__ == "__main__":
    run_main(main)
