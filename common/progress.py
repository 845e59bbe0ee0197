"""The bookkeeping of a pretraining loop that exact resume depends on, kept in one place so
that no script can get its order wrong. Each pretrain.py calls it explicitly:

    with Progress(...) as progress:                 # resumes from a checkpoint, if given
        while progress.epoch < args.max_epochs:
            for batch in progress.batches(loader):  # the rest of the epoch (sampler skip)
                ...                                 # views, lr, out = train_step(...)
                progress.step_done(out)             # sums, counters, NaN watch, logs, timer
            progress.epoch_done(knn_results)        # epoch record; last/best/backbone.pt

step_done writes last.pt part-way through an epoch every --checkpoint-every minutes, and on
SIGTERM or SIGUSR1 (what SLURM sends before it kills a job) writes it and raises Preempted
(exit code 75); a second signal exits at once. Every rank learns both at the same step, through
one small all-reduce on the CPU, so all ranks checkpoint (a collective) together.
"""
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common import dist
from common.checkpoint import all_rank_states, restore, save_checkpoint
from common.errors import PREEMPTED, NonFiniteLoss, Preempted
from common.log import RunLog, peak_memory_mb, summary


class FiniteCheck:
    """Watches every value a step returns for NaN/inf without a host synchronisation per step:
    the first bad step and its terms stay on the device until check(), which Progress calls
    every --log-every steps and before each checkpoint, so a bad step never reaches last.pt."""

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


class Interrupts:
    """When to checkpoint part-way through an epoch: a signal (then stop) or the timer."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, minutes: float, d):
        self.signalled, self.minutes, self.last = False, minutes, time.monotonic()
        self.group = dist.cpu_group() if d.world_size > 1 else None
        self.distributed = d.world_size > 1
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


class Progress:
    """Where a run stands (epochs finished, batches of the current epoch done, global step, best
    kNN top-1, the epoch's running sums and timings) and what happens at each boundary.
    `model`, `optimizer`, `scaler` are what last.pt holds; `backbone` is what backbone.pt holds;
    `method` names the checkpoints, so that finetune and resume refuse another method's."""

    def __init__(self, *, method, args, d, model, backbone, optimizer, scaler, loader,
                 resume_from=None):
        self.method, self.args, self.d, self.out_dir = method, args, d, Path(args.output_dir)
        self.model, self.backbone, self.optimizer, self.scaler = model, backbone, optimizer, scaler
        self.generator = loader.generator
        self.epoch = self.batch = self.step = 0
        self.best_top1, self.sums, self.wait, self.seconds = -1.0, {}, 0.0, 0.0
        if resume_from:  # checked and loaded before anything is written to the run directory
            ckpt = restore(resume_from, method, args, model, optimizer, scaler, d, self.generator)
            self.epoch, self.batch, self.step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
            self.best_top1 = ckpt["best_top1"]
            mine = ckpt["ranks"][d.rank]
            self.sums, self.wait, self.seconds = mine["sums"], mine["wait"], mine["seconds"]
        self.fresh = not resume_from
        self.log = RunLog(self.out_dir, vars(args), d.is_main, fresh=self.fresh)
        self.finite, self.interrupts = FiniteCheck(), Interrupts(args.checkpoint_every, d)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.interrupts.restore()
        self.log.close()
        if error is not None and not isinstance(error, Preempted):
            self.finite.check()  # a crash after a non-finite step (an SVD of NaNs): name it

    def batches(self, loader):
        """The rest of the current epoch's batches (the sampler skips those a mid-epoch
        checkpoint had trained), under a progress bar; the time spent waiting is counted."""
        args = self.args
        loader.sampler.set_epoch(self.epoch, skip=self.batch * args.batch_size)
        self.bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{args.max_epochs}",
                        initial=self.batch, total=self.batch + len(loader),
                        disable=not self.d.is_main)
        t = self.started = time.perf_counter()
        for batch in self.bar:
            self.wait += time.perf_counter() - t
            yield batch
            t = time.perf_counter()
        self.seconds += time.perf_counter() - self.started

    def step_done(self, out: dict) -> None:
        """After each train_step: its values (detached scalars, a "loss" key) summed for the
        epoch means and watched for NaN; logs every --log-every steps; last.pt when the timer
        or a signal says so (a signal then stops the run with Preempted)."""
        self.finite.update(out, self.step)
        self.sums = {k: self.sums.get(k, 0) + v for k, v in out.items()}
        self.step, self.batch = self.step + 1, self.batch + 1
        if self.step % self.args.log_every == 0:
            self.finite.check()
            values = {k: float(v) for k, v in out.items()}
            self.log.scalars(self.step, values, "train")
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values.get('lr', 0):.2e}")
        stop, save = self.interrupts.poll()
        if save:
            self.finite.check()
            now = time.perf_counter()
            self.seconds, self.started = self.seconds + now - self.started, now
            self.save()
            if stop:
                raise Preempted(f"a signal arrived: last.pt holds step {self.step} (epoch "
                                f"{self.epoch + 1}, batch {self.batch}); continue with the same "
                                f"command and --resume auto (exit code {PREEMPTED})")
            self.started = time.perf_counter()

    def untrained(self, knn: dict) -> None:
        """Log the kNN results of the network before training (epoch 0)."""
        if knn:
            record = {"epoch": 0, "step": 0, **knn}
            self.log.epoch(record)
            self.log.scalars(0, {k[4:]: v for k, v in knn.items()}, "knn")
            dist.print0(f"epoch 0 (untrained): {summary(record)}")

    def epoch_done(self, knn: dict) -> dict:
        """At an epoch's end: the record (means over ranks, speed, memory, `knn` results),
        logged and printed; last.pt, backbone.pt, best.pt and epochNNNN.pt written."""
        images = self.batch * self.args.batch_size * self.d.world_size
        record = {"epoch": self.epoch + 1, "step": self.step, **self.epoch_means(),
                  "images_per_s": images / max(1e-9, self.seconds),
                  "step_images_per_s": images / max(1e-9, self.seconds - self.wait),
                  "data_wait_s": self.wait, "data_wait_share": self.wait / max(1e-9, self.seconds),
                  "peak_memory_mb": peak_memory_mb(self.d.device), **knn}
        self.log.epoch(record)
        self.log.scalars(self.step, {k: v for k, v in record.items()
                                     if k not in ("epoch", "step") and k not in knn}, "epoch")
        self.log.scalars(self.step, {k[4:]: v for k, v in knn.items()}, "knn")
        self.best_top1 = max(self.best_top1, record.get("knn_top1", -1.0))
        is_best = record.get("knn_top1", -1.0) >= self.best_top1 >= 0
        self.epoch, self.batch, self.sums, self.wait, self.seconds = self.epoch + 1, 0, {}, 0.0, 0.0
        self.save(epoch_end=True, is_best=is_best)
        dist.print0(f"epoch {self.epoch}: {summary(record)}")
        return record

    def epoch_means(self) -> dict:
        """Per-epoch mean of every value the steps returned, averaged over ranks."""
        keys = sorted(self.sums)
        means = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32,
                                             device=self.d.device) for k in keys])
        return dict(zip(keys, dist.all_reduce_mean(means / max(1, self.batch)).tolist()))

    def save(self, epoch_end: bool = False, is_best: bool = False) -> None:
        """last.pt of the run as it stands (a collective: every rank's RNG state and sums);
        at an epoch's end also backbone.pt, best.pt (weights only: what finetune.py reads) and
        epochNNNN.pt, each written atomically."""
        part = {"sums": {k: float(v) for k, v in self.sums.items()}, "wait": self.wait,
                "seconds": self.seconds}
        ranks = all_rank_states(self.generator, part)
        self.interrupts.last = time.monotonic()
        if not self.d.is_main:
            return
        state = {"method": self.method, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "epoch": self.epoch, "batch": self.batch, "step": self.step,
                 "best_top1": self.best_top1, "args": vars(self.args),
                 "world_size": self.d.world_size, "ranks": ranks}
        save_checkpoint(state, self.out_dir / "last.pt")
        if not epoch_end:
            return
        save_checkpoint(self.backbone.state_dict(), self.out_dir / "backbone.pt")
        if is_best:
            weights = ("method", "model", "args", "epoch", "step", "best_top1")
            save_checkpoint({k: state[k] for k in weights}, self.out_dir / "best.pt")
        every = self.args.save_every
        if every and self.epoch % every == 0:
            shutil.copyfile(self.out_dir / "last.pt", self.out_dir / f"epoch{self.epoch:04d}.pt")
