"""MMCR pretraining (Maximum Manifold Capacity Representations).

    python mmcr/pretrain.py --batch-size 64 --num-views 16            # one GPU (or CPU)
    torchrun --nproc_per_node 8 mmcr/pretrain.py --batch-size 64 --num-views 16
    python mmcr/pretrain.py --output-dir runs/mmcr/<run> --resume auto  # continue a run
    python mmcr/pretrain.py --dataset synthetic --max-epochs 2 --dev    # offline smoke run
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

import torch

from common import dist
from common.augment import MultiView, View
from common.backbone import add_resnet_args, resolve_stem
from common.data import dataset_info, pretrain_data
from common.loop import fit
from common.train import (Parser, add_common_args, autocast, backward_step, resolve_output_dir,
                          resume_path, run_main, seed_everything, warmup_cosine)
from mmcr.model import MMCR, mmcr_loss


def get_args(argv=None):
    p = Parser(description="MMCR pretraining")
    add_common_args(p, batch_size=64, max_epochs=500, learning_rate=1e-3, warmup_duration=0.1,
                    weight_decay=1e-6)
    g = p.add_argument_group("mmcr")
    add_resnet_args(g)
    g.add_argument("--num-views", type=int, default=16, help="views per image (official "
                   "CIFAR: 40); memory grows with batch x views")
    g.add_argument("--hidden-dim", type=int, default=512, help="projector hidden width")
    g.add_argument("--projection-dim", type=int, default=128, help="embedding dim D")
    g.add_argument("--lmbda", type=float, default=0.0, help="weight of the local nuclear-norm "
                   "term (official default 0)")
    g.add_argument("--momentum-tau", type=float, default=None, help="enable the momentum branch "
                   "with this constant EMA (official ImageNet: 0.99); off by default as on CIFAR")
    args = p.parse_args(argv)
    if args.num_views < 2:
        p.error(f"--num-views must be at least 2 (got {args.num_views}): MMCR averages views")
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2: BatchNorm and the centroid matrix need it")
    return args


def view_transform(args, info) -> MultiView:
    """Independent random views per METHODS.md 1.3: the official CIFAR recipe; STL-10 with
    colour before the crop; ImageNet-style folders alternate the two Barlow view types."""
    size, norm = info.image_size, (info.mean, info.std)
    if info.name == "stl10":
        views = [View(size, *norm, scale=(0.2, 1.0), gray_p=0.1, colour_first=True,
                      interpolation="bicubic")] * args.num_views
    elif info.name == "imagefolder":
        kw = dict(jitter=(0.4, 0.4, 0.2, 0.1), interpolation="bicubic")
        pair = [View(size, *norm, blur_p=1.0, **kw), View(size, *norm, blur_p=0.1,
                                                          solarize_p=0.2, **kw)]
        views = [pair[v % 2] for v in range(args.num_views)]
    else:
        views = [View(size, *norm)] * args.num_views
    return MultiView(views)


def train_step(net, model, x, optimizer, scaler, lr, args) -> dict:
    """One step: all B x V views in one forward, MMCR loss, backward, Adam, momentum EMA.
    net: the (DDP/compiled) module to call; model: the plain module owning the EMA copy."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(args.precision, x.device):
        z, z_momentum = net(x, args.num_views)
    loss, logs = mmcr_loss(z, z_momentum, args.lmbda)
    backward_step(loss, optimizer, scaler)
    if args.momentum_tau is not None:
        model.update_momentum(args.momentum_tau)
    return {"loss": loss.detach(), **logs, "lr": lr}


def main(argv=None):
    args = get_args(argv)
    d = dist.setup(args.device)
    seed_everything(args.seed, d.rank)
    info = dataset_info(args.dataset, args.image_size)
    args.image_size, args.stem = info.image_size, resolve_stem(args.stem, info.image_size)
    out_dir = resolve_output_dir(args, "mmcr")
    resume_from = resume_path(args, out_dir)

    # ---- data: B images x V views per process and step
    loader, sampler, knn_data = pretrain_data(args, info, view_transform(args, info), d)

    # ---- model, optimizer
    model = MMCR(args.backbone, args.stem, args.image_size, args.hidden_dim,
                 args.projection_dim, momentum=args.momentum_tau is not None).to(d.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net = dist.prepare_model(model, d)
    net = torch.compile(net) if args.compile else net
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(d.device.type) if args.precision == "fp16" else None
    total = args.max_epochs * len(loader)
    warmup = int(args.warmup_duration * total)

    dist.print0("\n".join(f"  {k}: {v}" for k, v in sorted(vars(args).items())))
    images = args.batch_size * d.world_size
    dist.print0(f"world size {d.world_size} | per process {args.batch_size} images x "
                f"{args.num_views} views = {args.batch_size * args.num_views} crops | global "
                f"{images} images, {images * args.num_views} crops per step | {len(loader)} "
                f"steps/epoch | peak lr {args.learning_rate} (not batch-scaled) | {out_dir}")

    # ---- train
    def step_fn(batch, step):
        views, _ = batch  # V tensors of (B, C, H, W)
        x = torch.stack(views, 1).flatten(0, 1)  # (B*V, C, H, W), each image's views contiguous
        x = x.to(d.device, non_blocking=True).contiguous(memory_format=memory_format)
        lr = warmup_cosine(step, total, warmup, args.learning_rate)
        return train_step(net, model, x, optimizer, scaler, lr, args)

    fit(method="mmcr", args=args, d=d, model=model, optimizer=optimizer, scaler=scaler,
        step_fn=step_fn, loader=loader, sampler=sampler, backbone=model.backbone,
        knn_data=knn_data, out_dir=out_dir, resume_from=resume_from)
    dist.cleanup()


if __name__ == "__main__":
    run_main(main)
