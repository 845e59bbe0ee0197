"""The pretraining loop shared by every method: epochs of a method's step function, the kNN
monitor, logging (tqdm, TensorBoard, metrics.jsonl), checkpoints (last/best/backbone.pt, at
each epoch's end and every --checkpoint-every minutes) and preemption (SIGTERM, SIGUSR1).

A method hands over `step_fn(batch, step) -> dict of detached scalars` (with a "loss" key);
everything method-specific (forward, loss, optimizer step, EMA/queue update) lives there.
"""
import json
import math
import os
import resource
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from common import dist
from common.checkpoint import all_rank_states, restore, save_checkpoint
from common.knn import knn_eval
from common.train import PREEMPTED, NonFiniteLoss, Preempted


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


class FiniteCheck:
    """Watches every logged value for NaN/inf without a host synchronisation per step: the first
    bad step and its terms stay on the device until check(), which the loop calls every
    --log-every steps and before each checkpoint, so a bad step never reaches last.pt."""

    def __init__(self):
        self.first, self.bad, self.keys = None, None, []

    def update(self, out: dict, step: int) -> None:
        tensors = {k: v for k, v in out.items() if torch.is_tensor(v)}
        for k, v in out.items():  # python floats (lr, ...) are checked here and now
            if not torch.is_tensor(v) and not math.isfinite(v):
                raise non_finite([k], step)
        if not tensors:
            return
        bad = ~torch.isfinite(torch.stack([v.float() for v in tensors.values()]))
        if self.first is None:
            self.first, self.bad = torch.full_like(bad[0], -1, dtype=torch.long), bad
        new = (self.first < 0) & bad.any()
        self.first = torch.where(new, step, self.first)
        self.bad, self.keys = torch.where(new, bad, self.bad), list(tensors)

    def check(self) -> None:
        if self.first is not None and int(self.first) >= 0:
            raise non_finite([k for k, b in zip(self.keys, self.bad.tolist()) if b],
                             int(self.first))


def non_finite(terms: list, step: int) -> NonFiniteLoss:
    return NonFiniteLoss(f"non-finite {', '.join(terms)} at step {step}; the run stopped and "
                         "last.pt still holds the last checkpoint before it (try --precision "
                         "fp32 or a lower --learning-rate)")


@dataclass
class Position:
    """Where a run stands: epochs finished, batches of the current epoch done, the global step,
    the best kNN top-1, and the current epoch's running sums, data wait and seconds (per rank)."""
    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_top1: float = -1.0
    sums: dict = field(default_factory=dict)
    wait: float = 0.0
    seconds: float = 0.0

    def rank_part(self) -> dict:
        """What differs between ranks, in weights_only-loadable types."""
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "wait": self.wait,
                "seconds": self.seconds}


def save_run(out_dir, state, backbone, is_best, save_every) -> None:
    """At an epoch's end: last.pt (the full training state), backbone.pt, best.pt (weights
    only: model, args, epoch; what finetune.py reads) and epochNNNN.pt, each atomically."""
    save_checkpoint(state, out_dir / "last.pt")
    save_checkpoint(backbone.state_dict(), out_dir / "backbone.pt")
    if is_best:
        weights = ("method", "model", "args", "epoch", "step", "best_top1")
        save_checkpoint({k: state[k] for k in weights}, out_dir / "best.pt")
    if save_every and state["epoch"] % save_every == 0:
        shutil.copyfile(out_dir / "last.pt", out_dir / f"epoch{state['epoch']:04d}.pt")


class Interrupts:
    """When to checkpoint part-way through an epoch. SIGTERM and SIGUSR1 (what SLURM sends
    before it kills a job) raise a flag: the run writes last.pt at the next step boundary and
    stops with exit code 75; a second signal exits at once. --checkpoint-every N writes last.pt
    every N minutes of training. Every rank learns both at the same step, through one small
    all-reduce per step on the CPU, so all ranks checkpoint (a collective) together."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, minutes: float, d):
        self.signalled, self.minutes, self.last = False, minutes, time.monotonic()
        self.distributed = d.world_size > 1
        self.group = dist.cpu_group() if self.distributed else None
        self.previous = [signal.signal(sig, self.handle) for sig in self.SIGNALS]

    def restore(self) -> None:
        """The signal handlers as they were before the run."""
        for sig, handler in zip(self.SIGNALS, self.previous):
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.signalled:
            os._exit(128 + signum)
        self.signalled = True

    def poll(self) -> tuple[bool, bool]:
        """(stop now, checkpoint now), the same on every rank."""
        due = self.minutes > 0 and time.monotonic() - self.last >= 60 * self.minutes
        flags = torch.tensor([self.signalled, due], dtype=torch.int32)
        if self.distributed:
            torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX, self.group)
        return bool(flags[0]), bool(flags.any())


def summary(record: dict) -> str:
    """An epoch record (less its epoch number) as one readable line: floats rounded."""
    def show(v):
        return f"{v:.2f}" if isinstance(v, float) and abs(v) >= 10 else \
            f"{v:.4g}" if isinstance(v, float) else str(v)
    return " | ".join(f"{k} {show(v)}" for k, v in record.items() if k != "epoch")


def evaluate(backbone, knn_data, args, d) -> dict:
    """kNN top-1/top-5 with every rank extracting its shard of the bank and the test split
    (the same result as one process: common/knn.py)."""
    bank_loader, test_loader, n_classes = knn_data
    acc = knn_eval(backbone, bank_loader, test_loader, args.num_neighbours, args.temperature,
                   n_classes, d.device, args.precision)
    return {f"knn_{k}": v for k, v in acc.items()}


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
    pos, generator = Position(), data.loader.generator
    if resume_from:  # checked and loaded before anything is written to the run directory
        ckpt = restore(resume_from, method, args, model, optimizer, scaler, d, generator)
        pos = Position(ckpt["epoch"], ckpt["batch"], ckpt["step"], ckpt["best_top1"],
                       **ckpt["ranks"][d.rank])
    log, record = RunLog(out_dir, vars(args), d.is_main), {}
    if data.knn and args.eval_every and not resume_from:  # the untrained network's kNN
        record = {"epoch": 0, "step": 0, **evaluate(backbone, data.knn, args, d)}
        log.epoch(record)
        log.scalars(0, knn_values(record), "knn")
        dist.print0(f"epoch 0 (untrained): {summary(record)}")
    finite, interrupts = FiniteCheck(), Interrupts(args.checkpoint_every, d)

    def checkpoint(is_best=None):
        """last.pt of the run as it stands (a collective); with is_best, the epoch's files."""
        ranks = all_rank_states(generator, pos.rank_part())
        if d.is_main:
            state = {"method": method, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "epoch": pos.epoch, "batch": pos.batch, "step": pos.step,
                     "best_top1": pos.best_top1, "args": vars(args),
                     "world_size": d.world_size, "ranks": ranks}
            if is_best is None:
                save_checkpoint(state, out_dir / "last.pt")
            else:
                save_run(out_dir, state, backbone, is_best, args.save_every)
        interrupts.last = time.monotonic()

    try:
        while pos.epoch < args.max_epochs:
            train_epoch(pos, step_fn, data, args, d, finite, interrupts, log, checkpoint)
            record = end_epoch(pos, data, args, d, backbone, log)
            checkpoint(is_best=record.get("knn_top1", -1.0) >= pos.best_top1 >= 0)
            dist.print0(f"epoch {pos.epoch}: {summary(record)}")
    finally:
        interrupts.restore()
        log.close()
    return record


def train_epoch(pos, step_fn, data, args, d, finite, interrupts, log, checkpoint) -> None:
    """The rest of the current epoch, from batch pos.batch on. Every step asks `interrupts`
    whether to checkpoint (the timer) or to checkpoint and stop (a signal)."""
    data.sampler.set_epoch(pos.epoch, skip=pos.batch * args.batch_size)
    bar = tqdm(data.loader, desc=f"epoch {pos.epoch + 1}/{args.max_epochs}", initial=pos.batch,
               total=pos.batch + len(data.loader), disable=not d.is_main)
    t = t_start = time.perf_counter()
    for batch in bar:
        pos.wait += time.perf_counter() - t
        try:
            out = step_fn(data.prepare(batch), pos.step)
        except Exception:
            finite.check()  # a crash after a non-finite step (e.g. an SVD of NaNs): name it
            raise
        finite.update(out, pos.step)
        pos.sums = {k: pos.sums.get(k, 0) + v for k, v in out.items()}
        pos.step, pos.batch = pos.step + 1, pos.batch + 1
        if pos.step % args.log_every == 0:
            finite.check()
            values = {k: float(v) for k, v in out.items()}
            log.scalars(pos.step, values, "train")
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values.get('lr', 0):.2e}")
        stop, save = interrupts.poll()
        if save:
            finite.check()
            pos.seconds += time.perf_counter() - t_start
            t_start = time.perf_counter()
            checkpoint()
            if stop:
                raise Preempted(f"a signal arrived: last.pt holds step {pos.step} (epoch "
                                f"{pos.epoch + 1}, batch {pos.batch}); continue with the same "
                                f"command and --resume auto (exit code {PREEMPTED})")
        t = time.perf_counter()
    pos.seconds += time.perf_counter() - t_start


def end_epoch(pos, data, args, d, backbone, log) -> dict:
    """The epoch's record (means over ranks, speed, memory, kNN when due), logged; the
    position moves to the next epoch."""
    images = pos.batch * args.batch_size * d.world_size
    record = {"epoch": pos.epoch + 1, "step": pos.step,
              **epoch_means(pos.sums, pos.batch, d.device),
              "images_per_s": images / max(1e-9, pos.seconds),
              "step_images_per_s": images / max(1e-9, pos.seconds - pos.wait),
              "data_wait_s": pos.wait, "data_wait_share": pos.wait / max(1e-9, pos.seconds),
              "peak_memory_mb": peak_memory_mb(d.device)}
    if data.knn and args.eval_every and ((pos.epoch + 1) % args.eval_every == 0
                                         or pos.epoch + 1 == args.max_epochs):
        record.update(evaluate(backbone, data.knn, args, d))
    log.epoch(record)
    log.scalars(pos.step, {k: v for k, v in record.items() if k not in ("epoch", "step")
                           and not k.startswith("knn_")}, "epoch")
    log.scalars(pos.step, knn_values(record), "knn")
    pos.best_top1 = max(pos.best_top1, record.get("knn_top1", -1.0))
    pos.epoch, pos.batch, pos.sums, pos.wait, pos.seconds = pos.epoch + 1, 0, {}, 0.0, 0.0
    return record


def knn_values(record: dict) -> dict:
    """The kNN results of a record, for TensorBoard's knn/top1 and knn/top5 (one curve from
    step 0, the untrained network, on)."""
    return {k[4:]: v for k, v in record.items() if k.startswith("knn_")}
