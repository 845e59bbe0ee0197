"""The few training utilities every method needs: flags, errors, seeding, the learning-rate
schedule, precision, and checkpoint I/O (atomic save, checked load, --resume PATH|auto)."""
import argparse
import contextlib
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input: the scripts print the message as one line and exit with code 2."""


class NonFiniteLoss(Exception):
    """The loss went NaN/inf: the run stops with exit code 1; the last checkpoint is untouched."""


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and one-line errors (exit code 2)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def run_main(main, argv=None) -> None:
    """Run a script's main(argv), turning UserError/NonFiniteLoss into one line and an exit code."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def add_common_args(parser, *, batch_size, max_epochs, learning_rate, warmup_duration,
                    weight_decay, knn_temperature=0.5, learning_rate_help="peak learning rate"):
    """The flags every pretrain.py shares (MMCR playground spellings); defaults per method."""
    a = parser.add_argument
    a("--dataset", default="cifar10",
      choices=["cifar10", "cifar100", "stl10", "imagefolder", "synthetic"],
      help="synthetic is generated in-process and needs no files (offline smoke runs)")
    a("--data-dir", default="data", help="where datasets live (CIFAR/STL download here); "
      "for imagefolder: a root with train/ and val/ class folders, or a flat image folder")
    a("--image-size", type=int, default=None, help="crop size; unset: the dataset's "
      "(32 CIFAR/synthetic, 64 STL-10, 224 imagefolder)")
    a("--batch-size", type=int, default=batch_size, help="images per process per step "
      "(the global batch is this x world size)")
    a("--max-epochs", type=int, default=max_epochs, help="pretraining epochs")
    a("--learning-rate", type=float, default=learning_rate, help=learning_rate_help)
    a("--warmup-duration", type=float, default=warmup_duration,
      help="linear warmup as a fraction of all steps, then cosine decay")
    a("--weight-decay", type=float, default=weight_decay, help="weight decay")
    a("--num-neighbours", type=int, default=200, help="k of the kNN monitor")
    a("--temperature", type=float, default=knn_temperature, help="kNN vote temperature T "
      "(weights exp(cos/T))")
    a("--eval-every", type=int, default=1, help="kNN every N epochs (0: never)")
    a("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
      help="DataLoader workers per process")
    a("--dev", type=int, nargs="?", const=2048, default=0, help="use only the first N images of"
      " each split for a quick look (N = 2048 when given without a value; 0: all)")
    a("--output-dir", default=None, help="run directory; unset: runs/<method>/<dataset>-<time>")
    a("--resume", default=None, help="checkpoint path, or 'auto' for last.pt of --output-dir "
      "(or of the newest run of this method)")
    a("--save-every", type=int, default=0, help="also keep epochNNNN.pt every N epochs (0: off)")
    a("--log-every", type=int, default=50, help="steps between TensorBoard/progress updates")
    a("--seed", type=int, default=42, help="random seed (each process uses seed + rank)")
    a("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
      help="autocast dtype for the networks; losses always run in float32. bf16 on recent GPUs")
    a("--compile", action="store_true", help="torch.compile the training forward")
    a("--channels-last", action="store_true", help="channels-last memory format (faster convs "
      "with bf16/fp16 on GPU)")
    a("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if present")


def seed_everything(seed: int, rank: int) -> None:
    """Seed python and torch with seed + rank, so each process draws different views."""
    random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def warmup_cosine(step: int, total: int, warmup: int, peak: float, final: float = 0.0) -> float:
    """Linear warmup from 0 to `peak` over `warmup` steps, then cosine from `peak` to `final`
    at step `total`. A pure function of the step, so resuming needs only the step count."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))


def autocast(precision: str, device: torch.device):
    """Autocast context for the networks; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def backward_step(loss, optimizer, scaler=None, clip_params=None, max_norm=math.inf):
    """zero_grad, backward (loss-scaled for fp16), optional grad-norm clipping of `clip_params`
    on the unscaled gradients, then the optimizer step. Returns the clipped norm (or None)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    norm = None if clip_params is None else torch.nn.utils.clip_grad_norm_(clip_params, max_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return norm


def rng_state() -> dict:
    """This process's RNG state (python, torch CPU, CUDA) in weights_only-loadable types."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def all_rng_states() -> list:
    """RNG states of every rank (rank order), so a resumed run continues each rank exactly."""
    if not dist.is_initialized():
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, path: Path) -> None:
    """Write then rename, so a kill during the write never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, method: str) -> dict:
    """Load a checkpoint written by `method`'s pretrain.py, with one-line errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
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


def resume_path(args, out_dir: Path):
    """The checkpoint to resume from (None: fresh start). Refuses to overwrite a run silently."""
    if args.resume == "auto":
        return out_dir / "last.pt" if (out_dir / "last.pt").is_file() else None
    if args.resume:
        return Path(args.resume)
    if (out_dir / "last.pt").is_file():
        raise UserError(f"{out_dir} already holds a run: pass --resume auto to continue it "
                        "or choose another --output-dir")
    return None
