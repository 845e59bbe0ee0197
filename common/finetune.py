"""The supervised loop every finetune.py uses: a linear probe on a frozen backbone
(`--finetune-type linear`) or the backbone trained with the classifier (`backbone+linear`)."""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import dist
from common.augment import eval_transform, supervised_transform
from common.data import dataset_info, eval_loader, load_split, num_classes, train_loader
from common.knn import accuracy
from common.loop import RunLog
from common.train import (Parser, UserError, autocast, load_checkpoint, save_checkpoint,
                          seed_everything, warmup_cosine)


def finetune_args(description: str) -> Parser:
    """Flags of finetune.py (MMCR playground defaults: Adam, lr 1e-2, batch 1024, 50 epochs)."""
    p = Parser(description=description)
    a = p.add_argument
    a("--checkpoint", required=True, help="last.pt or best.pt written by pretrain.py")
    a("--finetune-type", default="linear", choices=["linear", "backbone+linear"],
      help="linear: frozen backbone in eval mode, only the classifier trains")
    a("--batch-size", type=int, default=1024, help="images per process per step")
    a("--max-epochs", type=int, default=50, help="finetune epochs")
    a("--learning-rate", type=float, default=1e-2, help="peak Adam learning rate")
    a("--warmup-duration", type=float, default=0.1, help="warmup fraction, then cosine")
    a("--weight-decay", type=float, default=1e-6, help="Adam weight decay")
    a("--dataset", default=None, help="unset: the pretraining dataset (must be labelled)")
    a("--data-dir", default=None, help="unset: the pretraining --data-dir")
    a("--num-workers", type=int, default=8, help="DataLoader workers per process")
    a("--dev", type=int, nargs="?", const=2048, default=0, help="first N images only")
    a("--output-dir", default=None, help="unset: <checkpoint dir>/finetune-<type>")
    a("--seed", type=int, default=42, help="random seed (seed + rank per process)")
    a("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
    a("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if present")
    return p


def pretrain_state(path: str, method: str) -> tuple[dict, dict]:
    """(model state_dict, pretraining args) of a pretrain.py checkpoint."""
    ckpt = load_checkpoint(path, method)
    return ckpt["model"], ckpt["args"]


def load_backbone(backbone: nn.Module, state: dict, prefix: str) -> None:
    """Load the `prefix`-ed tensors of a pretraining state_dict into `backbone`; every backbone
    tensor must load (only a classifier 'fc.' / 'heads.' may be absent)."""
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    result = backbone.load_state_dict(picked, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("fc.", "heads."))]
    if missing or result.unexpected_keys:
        raise UserError(f"backbone did not load: {len(missing)} missing tensors (e.g. "
                        f"{missing[:2]}), {len(result.unexpected_keys)} unexpected")
    dist.print0(f"loaded {len(picked)} backbone tensors from '{prefix}*'")


def _data(args, pre_args, d):
    name = args.dataset or pre_args["dataset"]
    info = dataset_info(name, pre_args.get("image_size"))
    data_dir = args.data_dir or pre_args["data_dir"]
    train = load_split(info, data_dir, "train", supervised_transform(
        info.image_size, info.mean, info.std), args.seed, args.dev)
    test = load_split(info, data_dir, "test", eval_transform(
        info.image_size, info.mean, info.std, info.test_resize), args.seed, args.dev)
    if train is None or test is None or not num_classes(train):
        raise UserError(f"{name} at {data_dir} has no labelled train/ and val/ splits to "
                        "finetune on")
    return train, test


@torch.no_grad()
def evaluate(net, loader, device, precision) -> dict:
    net.eval()
    logits, labels = [], []
    for x, y in loader:
        with autocast(precision, device):
            logits.append(net(x.to(device)).float())
        labels.append(y.to(device))
    return accuracy(torch.cat(logits), torch.cat(labels))


def run_finetune(args, backbone: nn.Module, feat_dim: int, pre_args: dict) -> dict:
    """Train a linear classifier on `backbone` features (and the backbone for backbone+linear);
    logs top-1/top-5 on the test split every epoch, writes metrics.jsonl and last.pt."""
    d = dist.setup(args.device)
    seed_everything(args.seed, d.rank)
    train, test = _data(args, pre_args, d)
    loader, sampler = train_loader(train, args.batch_size, args.num_workers, d, args.seed)
    test_loader = eval_loader(test, args.batch_size, args.num_workers)
    linear = args.finetune_type == "linear"
    backbone.requires_grad_(not linear)
    net = nn.Sequential(backbone, nn.Linear(feat_dim, num_classes(train))).to(d.device)
    before = {k: v.clone() for k, v in backbone.state_dict().items()} if linear else None

    ddp_net = dist.prepare_model(net, d)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, args.learning_rate, weight_decay=args.weight_decay)
    total = args.max_epochs * len(loader)
    out = Path(args.output_dir or Path(args.checkpoint).parent / f"finetune-{args.finetune_type}")
    log = RunLog(out, vars(args), d.is_main)
    dist.print0(f"finetune ({args.finetune_type}): {len(train)} images, {num_classes(train)} "
                f"classes, global batch {args.batch_size * d.world_size}, lr {args.learning_rate}")
    step, record = 0, {}
    for epoch in range(args.max_epochs):
        sampler.set_epoch(epoch)
        ddp_net.train()
        if linear:
            backbone.eval()  # frozen: BN running statistics must not move
        for x, y in tqdm(loader, desc=f"epoch {epoch + 1}", disable=not d.is_main):
            lr = warmup_cosine(step, total, int(args.warmup_duration * total), args.learning_rate)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(args.precision, d.device):
                loss = F.cross_entropy(ddp_net(x.to(d.device)).float(), y.to(d.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if d.is_main:
            record = {"epoch": epoch + 1, "loss": loss.item(),
                      **evaluate(net, test_loader, d.device, args.precision)}
            log.epoch(record)
            log.scalars(step, {k: v for k, v in record.items() if k != "epoch"}, "finetune")
            save_checkpoint({"model": net.state_dict(), "args": vars(args),
                             "epoch": epoch + 1}, out / "last.pt")
            dist.print0(f"epoch {epoch + 1}: {record}")
        dist.barrier()
    if linear and any(not torch.equal(v, backbone.state_dict()[k]) for k, v in before.items()):
        raise RuntimeError("linear probe changed the frozen backbone (weights or BN statistics)")
    log.close()
    dist.cleanup()
    return record
