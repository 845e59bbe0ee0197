"""What a run writes for people to read: args.json, TensorBoard events, metrics.jsonl (rank 0
only), and the one-line epoch summaries it prints."""
import json
import resource
import time
from pathlib import Path

import torch


class RunLog:
    """args.json, TensorBoard events and metrics.jsonl in the run directory (rank 0 only; on
    other ranks every method does nothing). A `fresh` run in a directory that holds another
    run's logs (one that stopped before its first checkpoint) moves them aside first."""

    def __init__(self, out_dir: Path, args: dict, is_main: bool, fresh: bool = False):
        self.writer, self.jsonl = None, None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter
            if fresh:
                set_aside(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "args.json").write_text(json.dumps(args, indent=2, sort_keys=True))
            self.writer = SummaryWriter(out_dir)
            self.jsonl = open(out_dir / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict, prefix: str) -> None:
        """TensorBoard scalars `prefix/name` at `step`."""
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def epoch(self, record: dict) -> None:
        """One line of metrics.jsonl."""
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.jsonl.close()


def set_aside(out_dir: Path) -> None:
    """Move the logs of an earlier run in `out_dir` into out_dir/stopped-<time>/, with a notice,
    so that a new start never appends to them."""
    old = [p for p in out_dir.glob("*") if p.name in ("args.json", "metrics.jsonl")
           or p.name.startswith("events.out.tfevents")]
    if not old:
        return
    aside = out_dir / f"stopped-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for p in old:
        p.rename(aside / p.name)
    print(f"notice: {out_dir} holds the logs of a run that left no last.pt (it stopped before "
          f"its first checkpoint): starting over, its logs moved to {aside}", flush=True)


def summary(record: dict) -> str:
    """An epoch record (less its epoch number) as one readable line: floats rounded."""
    def show(v):
        return f"{v:.2f}" if isinstance(v, float) and abs(v) >= 10 else \
            f"{v:.4g}" if isinstance(v, float) else str(v)
    return " | ".join(f"{k} {show(v)}" for k, v in record.items() if k != "epoch")


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated (CUDA) or peak resident memory of this process (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
