"""Checkpoints: the run directory, atomic writes, checked loads, and the files of a run that
resume depends on (last.pt with every rank's RNG state; backbone.pt, best.pt, epochNNNN.pt)."""
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common.dist import print0
from common.errors import UserError

# what a resumed run takes from this command line, not from its checkpoint: this machine's
# settings and where the run goes; with the rest of RESUMABLE, what may change on a resume (any
# other difference is refused)
OF_THIS_COMMAND = {"device", "threads", "num_workers", "compile", "resume", "output_dir",
                   "explicit"}
RESUMABLE = OF_THIS_COMMAND | {"eval_every", "log_every", "save_every", "checkpoint_every",
                               "max_epochs", "dist_timeout"}


def save_checkpoint(state: dict, path: Path) -> None:
    """Write then rename, so a kill during the write never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, method: str) -> dict:
    """Load a checkpoint written by `method`'s pretrain.py, with one-line errors otherwise
    (memory-mapped: reading its args costs little)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a file: give its last.pt "
                        f"({path / 'last.pt'}) or best.pt")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated file, not a torch file, unsafe pickle
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint of this repository "
                        f"({type(e).__name__}); resume from another with --resume PATH (an "
                        "epochNNNN.pt of --save-every) or start a new --output-dir") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != method:
        found = ckpt.get("method", "unknown") if isinstance(ckpt, dict) else "unknown"
        raise UserError(f"checkpoint {path} comes from '{found}' pretraining, not '{method}'")
    return ckpt


def resolve_output_dir(args, method: str) -> Path:
    """--output-dir, or for --resume auto the newest run of this method, else a new dir."""
    if args.output_dir:
        return Path(args.output_dir)
    runs = sorted(Path("runs", method).glob("*/last.pt"), key=os.path.getmtime)
    if args.resume == "auto" and runs:
        return runs[-1].parent
    return Path("runs", method, f"{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")


def resume_point(args, method: str) -> tuple:
    """(the checkpoint to resume, or None for a fresh start; the flags the run was started
    with, {} for a new run). Without --resume a folder that holds a run is refused, never
    overwritten. --resume auto where the run left no last.pt starts it over with the flags of
    its args.json (it stopped before its first checkpoint), or a new run where there is none."""
    out_dir = Path(args.output_dir)
    path = Path(args.resume) if args.resume not in (None, "auto") else out_dir / "last.pt"
    if args.resume is None and path.is_file():
        raise UserError(f"{out_dir} already holds a run: pass --resume auto to continue it "
                        "or choose another --output-dir")
    if args.resume and (args.resume != "auto" or path.is_file()):
        return path, load_checkpoint(path, method)["args"]
    if args.resume is None:
        return None, {}
    if not (out_dir / "args.json").is_file():
        print0(f"notice: --resume auto: {out_dir} holds no run to resume; starting a new one")
        return None, {}
    print0(f"notice: {out_dir} has no last.pt (it stopped before its first checkpoint): "
           "starting over with the flags of its args.json")
    return None, json.loads((out_dir / "args.json").read_text())


def rng_state(loader_generator) -> dict:
    """This process's RNG state (python, torch CPU, CUDA, the train loader's generator) in
    weights_only-loadable types."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "loader": loader_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, loader_generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_ranks(state: dict) -> list:
    """Every rank's `state`, in rank order (a collective)."""
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


class Checkpoint:
    """The files of a run: last.pt (model, optimizer, scaler, the position: epoch, batch of it
    done, global step; the flags; every rank's RNG state and meter), written atomically by rank
    0 at every epoch end, every --checkpoint-every minutes and on a preemption signal; at epoch
    ends also backbone.pt (weights of `backbone`), best.pt (weights at the best kNN top-1) and
    epochNNNN.pt (--save-every). `method` names the checkpoints, so that finetune and resume
    refuse another method's."""

    def __init__(self, method, args, d, model, backbone, optimizer, scaler, loader_generator):
        self.method, self.args, self.d, self.out_dir = method, args, d, Path(args.output_dir)
        self.model, self.backbone, self.optimizer, self.scaler = model, backbone, optimizer, scaler
        self.generator, self.best_top1 = loader_generator, -1.0

    def resume(self, meter) -> tuple:
        """(epoch, batch, step) to start from: where last.pt stopped, with the model,
        optimizer, scaler, this rank's RNG and meter restored and a line saying so; (0, 0, 0)
        for a new run. A checkpoint of other settings is refused before anything is written; a
        longer --max-epochs extends the run (every schedule is a function of the step and the
        run's length, so the cosine is recomputed for the new length from the step reached)."""
        if not self.args.resume:
            return 0, 0, 0
        path, args, d = self.args.resume, self.args, self.d
        ckpt = load_checkpoint(path, self.method)
        if "optimizer" not in ckpt:
            raise UserError(f"{path} holds weights only (a best.pt): resume from last.pt")
        changed = [f"--{k.replace('_', '-')}: the checkpoint has {v}, this command "
                   f"{vars(args)[k]}" for k, v in sorted(ckpt["args"].items())
                   if k not in RESUMABLE and vars(args).get(k, v) != v]
        if changed or ckpt["world_size"] != d.world_size:
            what = changed or [f"world size {ckpt['world_size']} -> {d.world_size}"]
            raise UserError(f"cannot resume {path}: it was trained with other settings "
                            f"({'; '.join(what)}); use the original flags or a new --output-dir")
        epoch, batch, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        if args.max_epochs < epoch + (batch > 0):
            raise UserError(f"cannot resume {path} with --max-epochs {args.max_epochs}: it "
                            f"has already trained {epoch} epochs")
        if epoch == args.max_epochs:
            print0(f"{path} has finished all {epoch} epochs: nothing to do (a larger "
                   "--max-epochs extends it)")
            return epoch, batch, step
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        mine = ckpt["ranks"][d.rank]
        set_rng_state(mine["rng"], self.generator)
        meter.load(mine.get("meter"))  # None in a last.pt of an older version
        self.best_top1 = ckpt["best_top1"]
        old = ckpt["args"]["max_epochs"]
        extended = f"; extended from {old} to {args.max_epochs} epochs, the schedules " \
            "recomputed for the new length" if old != args.max_epochs else ""
        print0(f"resumed {path} at step {step} (epoch {epoch + 1}, batch {batch}){extended}")
        return epoch, batch, step

    def save(self, epoch: int, batch: int, step: int, meter, knn: dict | None = None) -> None:
        """last.pt at this position (a collective: every rank's RNG state and meter), after the
        meter's check that no step since the last one went non-finite. With the epoch's `knn`
        results (at an epoch's end, epoch = epochs finished) also backbone.pt, best.pt and
        epochNNNN.pt, each written atomically."""
        meter.check()
        ranks = all_ranks({"rng": rng_state(self.generator), "meter": meter.state()})
        epoch_end = knn is not None
        top1 = (knn or {}).get("knn_top1", -1.0)
        is_best = epoch_end and top1 >= max(self.best_top1, 0)
        self.best_top1 = max(self.best_top1, top1)
        if not self.d.is_main:
            return
        state = {"method": self.method, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "epoch": epoch, "batch": batch, "step": step, "best_top1": self.best_top1,
                 "args": vars(self.args), "world_size": self.d.world_size, "ranks": ranks}
        save_checkpoint(state, self.out_dir / "last.pt")
        if not epoch_end:
            return
        save_checkpoint(self.backbone.state_dict(), self.out_dir / "backbone.pt")
        if is_best:
            weights = ("method", "model", "args", "epoch", "step", "best_top1")
            save_checkpoint({k: state[k] for k in weights}, self.out_dir / "best.pt")
        every = self.args.save_every
        if every and epoch % every == 0:
            shutil.copyfile(self.out_dir / "last.pt", self.out_dir / f"epoch{epoch:04d}.pt")
