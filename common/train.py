"""The few training utilities every method needs: flags, errors, seeding, the learning-rate
schedule, precision, and checkpoint I/O (atomic save, checked load, --resume PATH|auto)."""
import argparse
import contextlib
import ctypes
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common.dist import print0

DATASETS = ["cifar10", "cifar100", "stl10", "imagefolder", "synthetic"]
FAMILIES = ["cifar", "stl10", "imagenet"]  # the kinds of data a recipe is written for


class UserError(Exception):
    """Bad input: the scripts print the message as one line and exit with code 2."""


class NonFiniteLoss(Exception):
    """The loss went NaN/inf: the run stops with exit code 1; the last checkpoint is untouched."""


PREEMPTED = 75  # exit code of a run stopped by SIGTERM/SIGUSR1 after writing last.pt


class Preempted(Exception):
    """A signal stopped the run at a step boundary, after its checkpoint: exit code 75."""


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and one-line errors (exit code 2)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def run_main(main, argv=None) -> None:
    """Run a script's main(argv), turning UserError/NonFiniteLoss/Preempted into one line and an
    exit code (2, 1, 75)."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED)
    except RuntimeError as e:
        if not peer_failure(e):
            raise
        print(f"error: another rank failed or stopped answering ({str(e).splitlines()[0][-160:]}"
              "); its own error is above", file=sys.stderr, flush=True)
        sys.exit(1)


def peer_failure(e: Exception) -> bool:
    """A collective that failed because a peer process died or timed out: gloo raises a
    RuntimeError naming itself, NCCL a DistError."""
    return dist.is_initialized() and (isinstance(e, dist.DistError) or "gloo" in str(e).lower())


def at_least(minimum: int, kind=int):
    """argparse type: a number >= minimum, else a one-line error naming the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} (got {text})")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = at_least(0, float)(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be positive (got 0)")
    return value


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and SLURM set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def add_common_args(parser, *, knn_temperature=0.5, learning_rate_help="peak learning rate"):
    """The flags every pretrain.py shares (MMCR playground spellings). The flags a recipe sets
    (batch size, epochs, learning rate, ...) are added by the method with its recipes."""
    a = parser.add_argument
    a("--dataset", default="cifar10", choices=DATASETS,
      help="synthetic is generated in-process and needs no files (offline smoke runs)")
    a("--data-dir", default="data", help="where datasets live (CIFAR/STL download here); "
      "for imagefolder: a root with train/ and val/ class folders, or a flat image folder")
    a("--recipe", default="auto", choices=["auto", *FAMILIES], help="the method's defaults for "
      "this kind of data (views, normalisation, stem, hyper-parameters); auto: cifar for "
      "CIFAR/synthetic, stl10 for STL-10, and for an image folder by the image size (up to 48 "
      "px cifar, up to 128 px stl10, else imagenet). Flags given explicitly always win")
    a("--image-size", type=at_least(1), default=None, help="crop size; unset: the dataset's "
      "(32 CIFAR/synthetic, 64 STL-10), for an image folder the recipe's (32/64/224)")
    a("--mean", type=float, nargs=3, default=None, help="normalisation mean (RGB); unset: the "
      "dataset's, for an image folder the recipe's (CIFAR-10 / STL-10 / ImageNet constants)")
    a("--std", type=float, nargs=3, default=None, help="normalisation std (RGB); unset: as "
      "--mean")
    a("--batch-size", type=at_least(1), help="images per process per step (the global batch "
      "is this x world size)")
    a("--max-epochs", type=at_least(1), help="pretraining epochs")
    a("--learning-rate", type=positive_float, help=learning_rate_help)
    a("--warmup-duration", type=at_least(0, float),
      help="linear warmup as a fraction of all steps, then cosine decay")
    a("--weight-decay", type=at_least(0, float), help="weight decay")
    a("--num-neighbours", type=at_least(1), default=200, help="k of the kNN monitor")
    a("--temperature", type=positive_float, default=knn_temperature, help="kNN vote "
      "temperature T (weights exp(cos/T))")
    a("--eval-every", type=at_least(0), default=1, help="kNN every N epochs (0: never)")
    a("--augment", default="device", choices=["device", "pil"], help="device: the loader only "
      "decodes, the views of a whole batch are made on the training device with tensor ops; "
      "pil: each view made by PIL in the DataLoader workers (the reference)")
    a("--num-workers", type=at_least(0), default=min(8, cpu_cores()),
      help="DataLoader workers per process (the cores this process may use, at most 8)")
    a("--dev", type=at_least(0), nargs="?", const=2048, default=0, help="use only the first N "
      "images of each split for a quick look (N = 2048 when given without a value; 0: all)")
    a("--output-dir", default=None, help="run directory; unset: runs/<method>/<dataset>-<time>")
    a("--resume", default=None, help="checkpoint path, or 'auto' for last.pt of --output-dir "
      "(or of the newest run of this method)")
    a("--save-every", type=at_least(0), default=0, help="also keep epochNNNN.pt every N epochs "
      "(0: off)")
    a("--checkpoint-every", type=at_least(0, float), default=30, help="also write last.pt every "
      "N minutes of training, part-way through an epoch (0: at epoch ends only)")
    a("--dist-timeout", type=positive_float, default=10, help="minutes a collective waits for "
      "a missing rank before the run fails (torchrun)")
    a("--log-every", type=at_least(1), default=50, help="steps between TensorBoard/progress "
      "updates")
    a("--seed", type=int, default=42, help="random seed (each process uses seed + rank)")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="autocast dtype for the networks (losses always run in float32); auto: bf16 on a "
      "CUDA GPU that supports it, else fp32 (on a CPU with AVX512-BF16 or AMX, bf16 runs "
      "about 2.5x faster: pass it explicitly)")
    a("--compile", action="store_true", help="torch.compile the training forward")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="channels-"
      "last memory format of the CNNs; unset: on, except with fp32 on CUDA (faster "
      "convolutions: on 2 CPU cores 1.1-1.2x a ResNet-18 step)")
    a("--threads", type=at_least(1), default=None, help="torch intra-op threads per process; "
      "unset: this process's share of the cores, less one per PIL worker (printed at "
      "start)")
    a("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if present")


def cap_queue(size: int, epoch_images: int, flag: str) -> int:
    """A queue of past embeddings holds at most one epoch (`epoch_images`, a multiple of the
    global batch): longer, it would hold each image several times, an image's own older
    embedding among its neighbours or negatives. A longer one is shrunk, with a notice."""
    if size <= epoch_images:
        return size
    print0(f"notice: {flag} {size} is more than one epoch of the training set "
           f"({epoch_images} images): using {epoch_images}")
    return epoch_images


def thread_budget(workers: int, augment: str) -> int:
    """Intra-op threads: this process's share of the cores (torchrun's LOCAL_WORLD_SIZE
    processes per machine), less one per DataLoader worker when the workers make PIL views.
    Decode-only workers (--augment device) are counted as idle: on 2 cores a DenseCL step ran
    at 92 images/s with 1 worker and 2 threads, 54 with 1 worker and 1 thread."""
    share = cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, share - (workers if augment == "pil" else 0))


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next tensor instead of handing it back to
    the kernel. By default each allocation over the mmap threshold (128 KB, adapting up to
    32 MB) gets fresh pages, and the first touch of every 4 KB page is a page fault: on 2 CPU
    cores that made a batch of views and MMCR's training step about 20-30% slower. A no-op
    (False) where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def configure_runtime(args, device: torch.device) -> None:
    """Resolve --precision auto and --channels-last for the device, set the thread budget,
    cuDNN autotuning and malloc's reuse of freed memory, and print them."""
    keep_freed_memory()
    cuda = device.type == "cuda"
    if args.precision == "auto":
        args.precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if getattr(args, "channels_last", False) is None:
        args.channels_last = not cuda or args.precision != "fp32"
    threads = args.threads or thread_budget(args.num_workers, getattr(args, "augment", "pil"))
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = cuda
    print0(f"runtime: {device}, precision {args.precision}, channels-last "
           f"{bool(getattr(args, 'channels_last', False))}, {threads} torch threads and "
           f"{args.num_workers} DataLoader workers per process ({cpu_cores()} cores)")


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
