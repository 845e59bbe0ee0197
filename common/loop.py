"""The pretraining loop shared by every method: epochs of a method's step function, the kNN
monitor, logging (tqdm, TensorBoard, metrics.jsonl) and checkpoints (last/best/backbone.pt).

A method hands over `step_fn(batch, step) -> dict of detached scalars` (with a "loss" key);
everything method-specific (forward, loss, optimizer step, EMA/queue update) lives there.
"""
import json
import math
import resource
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common import dist
from common.knn import knn_eval
from common.train import (NonFiniteLoss, UserError, all_rng_states, load_checkpoint,
                          save_checkpoint, set_rng_state)

# flags that may change when a run is resumed; any other difference is refused
RESUMABLE = {"resume", "num_workers", "eval_every", "log_every", "save_every", "compile",
             "output_dir", "data_dir", "device", "explicit"}


class RunLog:
    """args.json, TensorBoard events and metrics.jsonl in the run directory (rank 0 only)."""

    def __init__(self, out_dir: Path, args: dict, is_main: bool):
        self.writer, self.jsonl = None, None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "args.json").write_text(json.dumps(args, indent=2, sort_keys=True))
            self.writer = SummaryWriter(out_dir)
            self.jsonl = open(out_dir / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict, prefix: str) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def epoch(self, record: dict) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.jsonl.close()


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated (CUDA) or peak resident memory of this process (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_finite(out: dict, step: int, device) -> None:
    """Stop at the first non-finite logged value (one host sync for all of them)."""
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device)
                          for v in out.values()])
    if not bool(torch.isfinite(values).all()):
        bad = [k for k, v in zip(out, values.tolist()) if not math.isfinite(v)]
        raise NonFiniteLoss(f"non-finite {', '.join(bad)} at step {step}; the run stopped and "
                            "last.pt still holds the last good epoch (try --precision fp32 or a "
                            "lower --learning-rate)")


def restore(ckpt_path, method, args, model, optimizer, scaler, d) -> dict:
    """Load a checkpoint into model/optimizer/scaler/RNG; refuse an incompatible one."""
    ckpt = load_checkpoint(ckpt_path, method)
    if "optimizer" not in ckpt:
        raise UserError(f"{ckpt_path} holds weights only (a best.pt): resume from last.pt")
    changed = sorted(k for k, v in ckpt["args"].items()
                     if k not in RESUMABLE and vars(args).get(k, v) != v)
    if changed or ckpt["world_size"] != d.world_size:
        what = changed or [f"world size {ckpt['world_size']} -> {d.world_size}"]
        raise UserError(f"cannot resume {ckpt_path}: it was trained with other settings "
                        f"({', '.join(what)}); use the original flags or a new --output-dir")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][d.rank])
    dist.print0(f"resumed {ckpt_path} at epoch {ckpt['epoch']}, step {ckpt['step']}")
    return ckpt


def save_run(out_dir, state, backbone, is_best, epoch, save_every) -> None:
    """last.pt (the full training state), backbone.pt, best.pt (weights only: model, args,
    epoch; what finetune.py reads) and epochNNNN.pt, each written atomically."""
    save_checkpoint(state, out_dir / "last.pt")
    save_checkpoint(backbone.state_dict(), out_dir / "backbone.pt")
    if is_best:
        weights = ("method", "model", "args", "epoch", "step", "best_top1")
        save_checkpoint({k: state[k] for k in weights}, out_dir / "best.pt")
    if save_every and epoch % save_every == 0:
        shutil.copyfile(out_dir / "last.pt", out_dir / f"epoch{epoch:04d}.pt")


def summary(record: dict) -> str:
    """An epoch record (less its epoch number) as one readable line: floats rounded."""
    def show(v):
        return f"{v:.2f}" if isinstance(v, float) and abs(v) >= 10 else \
            f"{v:.4g}" if isinstance(v, float) else str(v)
    return " | ".join(f"{k} {show(v)}" for k, v in record.items() if k != "epoch")


def evaluate(backbone, knn_data, args, d) -> dict:
    """kNN top-1/top-5 on rank 0 over the unsharded loaders; the other ranks wait."""
    result = {}
    if d.is_main:
        bank_loader, test_loader, n_classes = knn_data
        acc = knn_eval(backbone, bank_loader, test_loader, args.num_neighbours,
                       args.temperature, n_classes, d.device, args.precision)
        result = {f"knn_{k}": v for k, v in acc.items()}
    dist.barrier()
    return result


def epoch_means(sums: dict, n_steps: int, device) -> dict:
    """Per-epoch mean of every logged value, averaged over ranks."""
    keys = sorted(sums)
    means = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=device)
                         for k in keys]) / max(1, n_steps)
    return dict(zip(keys, dist.all_reduce_mean(means).tolist()))


def fit(*, method, args, d, model, optimizer, scaler, step_fn, data, backbone, out_dir,
        resume_from=None) -> dict:
    """Train `model` with `step_fn(views batch, step)` on `data` (common.data.PretrainData)
    from epoch 0 (or the checkpoint) to args.max_epochs. `backbone` is the encoder that kNN
    evaluates and backbone.pt holds."""
    knn_data, loader, sampler = data.knn, data.loader, data.sampler
    start_epoch, step, best, record = 0, 0, -1.0, {}
    do_eval = bool(knn_data and args.eval_every)
    if resume_from:  # checked and loaded before anything is written to the run directory
        ckpt = restore(resume_from, method, args, model, optimizer, scaler, d)
        start_epoch, step, best = ckpt["epoch"], ckpt["step"], ckpt["best_top1"]
    log = RunLog(out_dir, vars(args), d.is_main)
    if do_eval and not resume_from:  # the untrained network: the baseline of every later kNN
        record = {"epoch": 0, "step": 0, **evaluate(backbone, knn_data, args, d)}
        log.epoch(record)
        log.scalars(0, knn_values(record), "knn")
        dist.print0(f"epoch 0 (untrained): {summary(record)}")
    images_per_step = args.batch_size * d.world_size
    for epoch in range(start_epoch, args.max_epochs):
        sampler.set_epoch(epoch)
        model.train()
        sums, n_steps, wait = {}, 0, 0.0
        t_start = t = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.max_epochs}", disable=not d.is_main)
        for batch in bar:
            wait += time.perf_counter() - t
            out = step_fn(data.prepare(batch), step)
            check_finite(out, step, d.device)
            sums = {k: sums.get(k, 0) + v for k, v in out.items()}
            step, n_steps = step + 1, n_steps + 1
            if step % args.log_every == 0:
                values = {k: float(v) for k, v in out.items()}
                log.scalars(step, values, "train")
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values.get('lr', 0):.2e}")
            t = time.perf_counter()
        elapsed = time.perf_counter() - t_start
        record = {"epoch": epoch + 1, "step": step, **epoch_means(sums, n_steps, d.device),
                  "images_per_s": n_steps * images_per_step / elapsed,
                  "step_images_per_s": n_steps * images_per_step / max(1e-9, elapsed - wait),
                  "data_wait_s": wait, "peak_memory_mb": peak_memory_mb(d.device)}
        last = epoch + 1 == args.max_epochs
        if do_eval and ((epoch + 1) % args.eval_every == 0 or last):
            record.update(evaluate(backbone, knn_data, args, d))
        log.epoch(record)
        log.scalars(step, {k: v for k, v in record.items() if k not in ("epoch", "step")
                           and not k.startswith("knn_")}, "epoch")
        log.scalars(step, knn_values(record), "knn")
        is_best = record.get("knn_top1", -1.0) > best
        best = max(best, record.get("knn_top1", -1.0))
        rngs = all_rng_states()  # a collective: every rank takes part, rank 0 writes
        if d.is_main:
            state = {"method": method, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "epoch": epoch + 1, "step": step, "args": vars(args),
                     "world_size": d.world_size, "rng": rngs, "best_top1": best}
            save_run(out_dir, state, backbone, is_best, epoch + 1, args.save_every)
            dist.print0(f"epoch {epoch + 1}: {summary(record)}")
    log.close()
    return record


def knn_values(record: dict) -> dict:
    """The kNN results of a record, for TensorBoard's knn/top1 and knn/top5 (one curve from
    step 0, the untrained network, on)."""
    return {k[4:]: v for k, v in record.items() if k.startswith("knn_")}
