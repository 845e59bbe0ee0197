"""Process tuning, in one place: the device, precision and memory format a run resolves to, the
torch thread budget, glibc's reuse of freed memory, cuDNN autotuning, and seeding."""
import ctypes
import os
import random

import torch

from common.dist import print0


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and SLURM set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def thread_budget() -> int:
    """Intra-op threads: this process's share of the cores (torchrun's LOCAL_WORLD_SIZE
    processes per machine). DataLoader workers that only decode (pretraining) or crop and flip
    (finetune) are counted as idle: on 2 cores a DenseCL step ran at 92 images/s with 1 worker
    and 2 threads, 54 with 1 worker and 1 thread, and README's probe took 28 s with 2 workers
    and 2 threads, 35 s with 1 thread."""
    return max(1, cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def resolve_runtime(args) -> None:
    """Fill --device auto (cuda if present), --precision auto (bf16 on a CUDA GPU that supports
    it, else fp32), --channels-last unset (on, except fp32 on CUDA) and --threads unset."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    if args.precision == "auto":
        args.precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if getattr(args, "channels_last", False) is None:
        args.channels_last = not cuda or args.precision != "fp32"
    args.threads = args.threads or thread_budget()


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


def tune_process(args, rank: int) -> None:
    """Apply the resolved runtime (threads, cuDNN autotuning, malloc's reuse of freed memory),
    seed python and torch with seed + rank (each process draws different views), and print
    it."""
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.device == "cuda"
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    print0(f"runtime: {args.device}, precision {args.precision}, channels-last "
           f"{bool(getattr(args, 'channels_last', False))}, {args.threads} torch threads and "
           f"{args.num_workers} DataLoader workers per process ({cpu_cores()} cores)")
