"""The supervised loop every finetune.py uses: a linear probe on a frozen backbone
(`--finetune-type linear`) or the backbone trained with the classifier (`backbone+linear`).
Defaults: the MMCR playground's probe (Adam lr 1e-2, batch 1024, 50 epochs, 10% warmup);
README gives each method's official linear-evaluation command."""
import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import dist
from common.augment import View, eval_transform, view_transform
from common.checkpoint import load_checkpoint, save_checkpoint
from common.data import DATASETS, load_split, num_classes
from common.dist import gather_rows
from common.errors import UserError
from common.flags import add_machine_args, at_least, fraction, parser, positive, refuse_unused
from common.knn import accuracy, extract_features
from common.loaders import eval_loader, train_loader
from common.log import RunLog
from common.runtime import resolve_runtime, tune_process
from common.train import autocast, backward_step, warmup_cosine


def finetune_args(description: str) -> argparse.ArgumentParser:
    """Flags of finetune.py; data flags left unset follow the pretraining run."""
    p = parser(description)
    a = p.add_argument
    a("--checkpoint", required=True, help="last.pt or best.pt written by pretrain.py")
    a("--finetune-type", default="linear", choices=["linear", "backbone+linear"],
      help="linear: frozen backbone, only the classifier trains")
    a("--linear-bn", default="frozen", choices=["frozen", "train"], help="BatchNorm of the "
      "linear probe's frozen backbone. frozen: eval mode, the pretraining statistics normalise "
      "and stay (MoCo, DenseCL, solo-learn, MSN); train: train mode as the official MMCR "
      "probes, batch statistics normalise and the running statistics update")
    a("--batch-size", type=at_least(1), default=1024, help="images per process per step")
    a("--max-epochs", type=at_least(1), default=50, help="finetune epochs")
    a("--optimizer", default="adam", choices=["adam", "sgd", "nesterov"],
      help="sgd and nesterov: momentum 0.9")
    a("--learning-rate", type=positive, default=1e-2, help="peak learning rate")
    a("--schedule", default="cosine", choices=["cosine", "step"], help="cosine: per step, "
      "after --warmup-duration; step: x 0.1 at each epoch of --lr-steps")
    a("--lr-steps", type=at_least(1), nargs="+", default=[60, 80], help="epochs of the x 0.1 "
      "steps of --schedule step")
    a("--warmup-duration", type=fraction, default=0.1, help="warmup fraction (cosine "
      "schedule)")
    a("--weight-decay", type=at_least(0, float), default=1e-6, help="weight decay")
    a("--crop-interpolation", default="bilinear", choices=["bilinear", "bicubic"],
      help="of the training images' random resized crop (bicubic: the official MMCR ImageNet "
      "probe)")
    a("--dataset", default=None, choices=DATASETS, help="unset: the pretraining dataset "
      "(must be labelled)")
    a("--data-dir", default=None, help="unset: the pretraining --data-dir")
    a("--dev", type=at_least(0), nargs="?", const=2048, default=None, help="a fixed, class-"
      "balanced sample of N images of each split (a quarter of that of the test split); unset: "
      "the pretraining run's --dev")
    a("--output-dir", default=None, help="unset: <checkpoint dir>/finetune-<type>")
    a("--seed", type=int, default=42, help="random seed (seed + rank per process)")
    add_machine_args(p)
    return p


def load_pretrained(path, method: str, build, prefix: str):
    """The backbone of a `method` pretrain.py checkpoint: build(pretraining args) makes the
    untrained module and gives its feature width, then the checkpoint's `prefix`-ed tensors
    load into it; every backbone tensor must load (only a classifier 'fc.' / 'heads.' may be
    absent). Returns (module, width, the pretraining run's resolved flags)."""
    ckpt = load_checkpoint(path, method)
    pretrain_args = argparse.Namespace(**ckpt["args"])
    backbone, width = build(pretrain_args)
    picked = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    result = backbone.load_state_dict(picked, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("fc.", "heads."))]
    if missing or result.unexpected_keys:
        raise UserError(f"backbone did not load: {len(missing)} missing tensors (e.g. "
                        f"{missing[:2]}), {len(result.unexpected_keys)} unexpected")
    dist.print0(f"loaded {len(picked)} backbone tensors from '{prefix}*'")
    return backbone, width, pretrain_args


def _data(args, pretrain_args, train_view):
    """Train (train_view(pretraining flags), else random-resized crops and flips) and test (eval
    transform) splits, with the pretraining run's image size, normalisation and recipe."""
    data = argparse.Namespace(**{**vars(pretrain_args),
                                 "dataset": args.dataset or pretrain_args.dataset})
    data_dir = args.data_dir or data.data_dir
    dev = data.dev if args.dev is None else args.dev
    view = train_view(data) if train_view else View(  # crop and flip, no colour ops
        data.image_size, data.mean, data.std, jitter_p=0.0, gray_p=0.0,
        interpolation=args.crop_interpolation)
    train = load_split(data, data_dir, "train", view_transform(view), args.seed, dev)
    test = load_split(data, data_dir, "test", eval_transform(data), args.seed, dev)
    if train is None or test is None or not num_classes(train):
        raise UserError(f"{data.dataset} at {data_dir} has no labelled train/ and val/ splits to "
                        "finetune on")
    return train, test


def make_optimizer(params, args):
    if args.optimizer == "adam":
        return torch.optim.Adam(params, args.learning_rate, weight_decay=args.weight_decay)
    return torch.optim.SGD(params, args.learning_rate, momentum=0.9, weight_decay=args.weight_decay,
                           nesterov=args.optimizer == "nesterov")


def probe_lr(args, step: int, total: int, steps_per_epoch: int) -> float:
    """The learning rate at `step`: warmup + cosine, or x 0.1 at each of --lr-steps."""
    if args.schedule == "step":
        epoch = step // steps_per_epoch
        return args.learning_rate * 0.1 ** sum(epoch >= m for m in args.lr_steps)
    return warmup_cosine(step, total, int(args.warmup_duration * total), args.learning_rate)


def probe_batch(images: int, batch_size: int, world: int) -> int:
    """Images per process per step: --batch-size, or the whole training set as one global
    batch when it holds fewer images (with a notice), as a probe of a small run needs."""
    if images >= batch_size * world:
        return batch_size
    if images < world:
        raise UserError(f"{images} training images cannot be shared by {world} processes")
    dist.print0(f"notice: {images} training images, fewer than one global batch "
                f"({batch_size} x {world}): each step takes the whole set ({images // world} "
                "per process)")
    return images // world


def output_dir(args) -> Path:
    """The finetune run directory; refuses one that already holds a finetune run."""
    out = Path(args.output_dir or Path(args.checkpoint).parent / f"finetune-{args.finetune_type}")
    if (out / "metrics.jsonl").exists() or (out / "last.pt").exists():
        raise UserError(f"{out} already holds a finetune run: choose another --output-dir")
    return out


def check_flags(args, train_view) -> None:
    """A flag the chosen settings do not use is refused in one line."""
    linear, step = args.finetune_type == "linear", args.schedule == "step"
    refuse_unused(args, {
        "crop_interpolation": train_view and "the training images take a view of the "
        "pretraining recipe, with its own interpolation",
        "linear_bn": not linear and "--finetune-type backbone+linear trains the BatchNorm too",
        "lr_steps": not step and "it sets the steps of --schedule step",
        "warmup_duration": step and "--schedule step has no warmup"})


def run_finetune(args, backbone: nn.Module, feat_dim: int, pretrain_args, head=None,
                 train_view=None) -> dict:
    """Train a classifier on `backbone` features (and the backbone for backbone+linear); logs
    top-1/top-5 on the test split every epoch, writes metrics.jsonl and last.pt. `head` maps
    the class count to the classifier (default: one Linear layer); `train_view` maps the
    pretraining run's flags (data flags as this finetune resolves them) to the View of the
    training images (default: crop and flip)."""
    check_flags(args, train_view)
    resolve_runtime(args)
    d = dist.setup(args.device, args.dist_timeout)
    tune_process(args, d.rank)
    args.output_dir = str(output_dir(args))
    train, test = _data(args, pretrain_args, train_view)
    loader = train_loader(train, probe_batch(len(train), args.batch_size, d.world_size),
                          args.num_workers, d, args.seed)
    test_loader = eval_loader(test, args.batch_size, args.num_workers, d)
    linear = args.finetune_type == "linear"
    backbone.requires_grad_(not linear)
    classes = num_classes(train)
    net = nn.Sequential(backbone, head(classes) if head else nn.Linear(feat_dim, classes))
    net = net.to(d.device)
    before = {k: v.clone() for k, v in backbone.state_dict().items()} if linear else None

    ddp_net = dist.prepare_model(net, d)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    bn = f", BatchNorm {args.linear_bn if linear else 'trained'}" if has_bn else ""
    dist.print0(f"finetune ({args.finetune_type}{bn}): {len(train)} images, {classes} classes, "
                f"global batch {loader.batch_size * d.world_size}, {args.optimizer} lr "
                f"{args.learning_rate:g} ({args.schedule}) | {args.output_dir}")
    with RunLog(args, d, fresh=True) as log:
        record = train_classifier(args, net, ddp_net, backbone, loader, test_loader, d, log)
    if linear:
        check_frozen(backbone, before, args.linear_bn == "frozen")
    dist.cleanup()
    return record


def train_classifier(args, net, ddp_net, backbone, loader, test_loader, d, log) -> dict:
    """The epochs of run_finetune: train, then evaluate on the test split and log."""
    linear, total = args.finetune_type == "linear", args.max_epochs * len(loader)
    optimizer = make_optimizer([p for p in net.parameters() if p.requires_grad], args)
    scaler = torch.amp.GradScaler(d.device.type) if args.precision == "fp16" else None
    step, record = 0, {}
    for epoch in range(args.max_epochs):
        loader.sampler.set_epoch(epoch)
        ddp_net.train()
        if linear:
            backbone.train(args.linear_bn == "train")
        for x, y in tqdm(loader, desc=f"epoch {epoch + 1}", disable=not d.is_main):
            for group in optimizer.param_groups:
                group["lr"] = probe_lr(args, step, total, len(loader))
            with autocast(args.precision, d.device):
                loss = F.cross_entropy(ddp_net(x.to(d.device)).float(), y.to(d.device))
            backward_step(loss, optimizer, scaler)
            step += 1
        logits, labels = extract_features(net, test_loader, d.device, args.precision,
                                          normalize=False)  # this rank's shard of the test split
        record = {"epoch": epoch + 1, "step": step, "loss": loss.item(),
                  **accuracy(gather_rows(logits), gather_rows(labels))}
        if d.is_main:
            save_checkpoint({"model": net.state_dict(), "args": vars(args),
                             "epoch": epoch + 1}, Path(args.output_dir) / "last.pt")
        log.epoch(record, "finetune")
    return record


def check_frozen(backbone, before: dict, buffers_too: bool) -> None:
    """The linear probe must not have changed the backbone's weights (nor, with frozen BN,
    its statistics): MoCo v3's sanity check."""
    params = {k for k, _ in backbone.named_parameters()}
    for k, v in backbone.state_dict().items():
        if (k in params or buffers_too) and not torch.equal(v, before[k]):
            raise RuntimeError(f"the linear probe changed the frozen backbone's {k}")
