"""Checkpoints: the run directory, atomic writes, checked loads, every rank's RNG state, and
restoring a run (--resume PATH|auto) at an epoch boundary or part-way through an epoch."""
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common.dist import print0
from common.errors import UserError

# flags that may change when a run is resumed; any other difference is refused
RESUMABLE = {"resume", "num_workers", "eval_every", "log_every", "save_every", "compile",
             "output_dir", "data_dir", "device", "explicit", "threads", "checkpoint_every",
             "max_epochs", "dist_timeout"}
RENAMED = {"momentum_tau": "ema"}  # flags renamed since: a checkpoint's args read the new way


def rng_state(loader_generator=None) -> dict:
    """This process's RNG state (python, torch CPU, CUDA, the train loader's generator) in
    weights_only-loadable types."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def all_rank_states(loader_generator, part: dict) -> list:
    """Every rank's RNG state and `part` (its own running sums), in rank order (a collective),
    so a resumed run continues each rank exactly."""
    state = {"rng": rng_state(loader_generator), **part}
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state: dict, loader_generator=None) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "loader" in state and loader_generator is not None:
        loader_generator.set_state(state["loader"])


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
                        f"({type(e).__name__}); use another one, e.g. an epochNNNN.pt") from None
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


def resume_path(args):
    """The checkpoint to resume from (None: fresh start). Refuses to overwrite a run silently."""
    out_dir = Path(args.output_dir)
    if args.resume == "auto":
        return out_dir / "last.pt" if (out_dir / "last.pt").is_file() else None
    if args.resume:
        return Path(args.resume)
    if (out_dir / "last.pt").is_file():
        raise UserError(f"{out_dir} already holds a run: pass --resume auto to continue it "
                        "or choose another --output-dir")
    return None


def restore(ckpt_path, method, args, model, optimizer, scaler, d, loader_generator) -> dict:
    """Load a checkpoint into model/optimizer/scaler/RNG; refuse an incompatible one. A longer
    --max-epochs extends the run: every schedule is a function of (step, total steps), so the
    cosine is recomputed for the new length from the step reached (printed)."""
    ckpt = load_checkpoint(ckpt_path, method)
    if "optimizer" not in ckpt:
        raise UserError(f"{ckpt_path} holds weights only (a best.pt): resume from last.pt")
    saved = {RENAMED.get(k, k): v for k, v in ckpt["args"].items()}
    changed = [f"--{k.replace('_', '-')}: the checkpoint has {v}, this command {vars(args)[k]}"
               for k, v in sorted(saved.items())
               if k not in RESUMABLE and vars(args).get(k, v) != v]
    if changed or ckpt["world_size"] != d.world_size:
        what = changed or [f"world size {ckpt['world_size']} -> {d.world_size}"]
        raise UserError(f"cannot resume {ckpt_path}: it was trained with other settings "
                        f"({'; '.join(what)}); use the original flags or a new --output-dir")
    if args.max_epochs < ckpt["epoch"] + (ckpt.get("batch", 0) > 0):
        raise UserError(f"cannot resume {ckpt_path} with --max-epochs {args.max_epochs}: it "
                        f"has already trained {ckpt['epoch']} epochs")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["ranks"][d.rank].pop("rng"), loader_generator)
    old = ckpt["args"]["max_epochs"]
    extended = f"; extended from {old} to {args.max_epochs} epochs, the schedules recomputed " \
        "for the new length" if old != args.max_epochs else ""
    print0(f"resumed {ckpt_path} at epoch {ckpt['epoch']}, batch {ckpt.get('batch', 0)}, "
           f"step {ckpt['step']}{extended}")
    return ckpt
