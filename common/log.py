"""What a run records: the Meter of each step's values (kept on the device), the RunLog of its
directory (args.json, TensorBoard, metrics.jsonl, the progress bar and the epoch lines, and
the lock that keeps a second process out), and the lines printed at the start."""
import fcntl
import json
import math
import os
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common import dist
from common.errors import NonFiniteLoss, Preempted, UserError

NEVER = 2**62  # the first non-finite step of a value that never was


class Meter:
    """The values each train_step returns, summed on the device (a few small ops a step, no
    read): read every --log-every steps (latest()), checked for NaN/inf before each log line
    and checkpoint (check()), averaged over the epoch and the ranks at its end (epoch()).
    Python floats (the lr) are summed on the host. It also times the epoch (timed())."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.keys, self.sums, self.host, self.latest_host = [], None, {}, {}
        self.first_bad, self.last = None, None
        self.count, self.wait, self.seconds = 0, 0.0, 0.0

    def timed(self, batches):
        """`batches`, timed: the wait for each into `wait`, the whole loop into `seconds`."""
        mark = time.perf_counter()
        for batch in batches:
            now = time.perf_counter()
            self.wait, self.seconds = self.wait + now - mark, self.seconds + now - mark
            yield batch
            mark = time.perf_counter()
            self.seconds += mark - now

    def add(self, out: dict, step: int) -> None:
        """One step's values (detached 0-d tensors and floats); `step` counts it (1-based)."""
        self.keys = [k for k, v in out.items() if torch.is_tensor(v)]
        for k, v in out.items():
            if not torch.is_tensor(v):
                if not math.isfinite(v):
                    raise non_finite([k], step)
                self.host[k], self.latest_host[k] = self.host.get(k, 0.0) + v, v
        x = torch.stack([out[k] for k in self.keys]).float()  # (K,)
        if self.sums is None:
            self.sums = torch.zeros_like(x)
        if self.first_bad is None:
            self.first_bad = torch.full(x.shape, NEVER, dtype=torch.long, device=x.device)
        self.first_bad = torch.minimum(self.first_bad, torch.where(torch.isfinite(x), NEVER, step))
        self.sums.add_(x)
        self.last, self.count = x, self.count + 1

    def check(self) -> None:
        """NonFiniteLoss naming the values and the first step that went NaN/inf (one read)."""
        if self.first_bad is None:
            return
        first = self.first_bad.tolist()
        if min(first) < NEVER:
            raise non_finite([k for k, s in zip(self.keys, first) if s == min(first)],
                             min(first))

    def latest(self) -> dict:
        """The latest step's values as floats (a read from the device), checked first."""
        self.check()
        return {**dict(zip(self.keys, self.last.tolist())), **self.latest_host}

    def epoch(self, images_per_step: int) -> dict:
        """The epoch's record (each value's mean over steps and ranks, images/s in all and of
        the steps alone, the wait for data, peak memory); then the next epoch starts."""
        self.check()
        n = max(1, self.count)
        host = torch.tensor(list(self.host.values()), device=self.device)
        sums = torch.cat([self.sums if self.sums is not None else host[:0], host])
        means = dict(zip(self.keys + list(self.host), dist.all_reduce_mean(sums / n).tolist()))
        images = self.count * images_per_step
        seconds = max(1e-9, self.seconds)
        record = {**dict(sorted(means.items())), "images_per_s": images / seconds,
                  "step_images_per_s": images / max(1e-9, seconds - self.wait),
                  "data_wait_s": self.wait, "data_wait_share": self.wait / seconds,
                  "peak_memory_mb": peak_memory_mb(self.device)}
        self.reset()
        return record

    def state(self) -> dict:
        """What last.pt keeps of this rank's epoch so far (plain types), after check()."""
        sums = [] if self.sums is None else self.sums.tolist()
        return {"keys": self.keys, "sums": sums, "host": self.host, "count": self.count,
                "wait": self.wait, "seconds": self.seconds}

    def load(self, state: dict | None) -> None:
        if state:
            self.keys, self.host, self.count = state["keys"], state["host"], state["count"]
            self.wait, self.seconds = state["wait"], state["seconds"]
            self.sums = torch.tensor(state["sums"], device=self.device) if state["sums"] \
                else None


def non_finite(terms: list, step: int) -> NonFiniteLoss:
    return NonFiniteLoss(f"non-finite {', '.join(terms)} at step {step}; the run stopped and "
                         "last.pt still holds the last checkpoint before it (try --precision "
                         "fp32 or a lower --learning-rate)")


class RunLog:
    """The run directory as people read it, written by rank 0 (elsewhere a no-op): args.json,
    the flags that started the run (written once: a resume keeps the record), TensorBoard
    events, metrics.jsonl (a line per epoch), the progress bar and a printed line per epoch.
    The directory is locked while the run lives (the kernel releases it when the process dies):
    a second writer is refused. A `fresh` run moves an earlier run's logs aside (one that
    stopped before its first checkpoint). A crash in the `with` block after a non-finite step
    (an SVD of NaNs) is reported as that step of `meter`."""

    def __init__(self, args, d, fresh: bool, meter: Meter | None = None):
        self.args, self.is_main, self.meter = args, d.is_main, meter
        self.writer, self.jsonl, self.lock = None, None, None
        if not d.is_main:
            return
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.lock = lock(out / "run.lock")
        from torch.utils.tensorboard import SummaryWriter
        if fresh:
            set_aside(out)
            (out / "args.json").write_text(json.dumps(vars(args), indent=2, sort_keys=True))
        self.writer = SummaryWriter(out)
        self.jsonl = open(out / "metrics.jsonl", "a")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if self.writer:
            self.writer.close()
            self.jsonl.close()
        if self.lock:
            self.lock.close()
        if self.meter and error is not None and not isinstance(error, (Preempted, UserError)):
            self.meter.check()

    def bar(self, loader, epoch: int, batch: int):
        """The loader under a progress bar (rank 0) that starts at `batch` of the epoch."""
        self.progress = tqdm(loader, desc=f"epoch {epoch + 1}/{self.args.max_epochs}",
                             initial=batch, total=batch + len(loader), disable=not self.is_main)
        return self.progress

    def step(self, step: int) -> None:
        """The meter's latest values (read from the device) into TensorBoard and the bar."""
        values = self.meter.latest()
        self.scalars(step, values, "train")
        self.progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values.get('lr', 0):.2e}")

    def epoch(self, record: dict, prefix: str = "epoch") -> None:
        """An epoch's record into metrics.jsonl, TensorBoard (kNN results under knn/, the rest
        under `prefix`/) and a printed line; epoch 0 (the untrained kNN) only when it has one."""
        if record["epoch"] == 0 and not any(k.startswith("knn_") for k in record):
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        knn = {k[4:]: v for k, v in record.items() if k.startswith("knn_")}
        rest = {k: v for k, v in record.items() if not k.startswith("knn_")
                and k not in ("epoch", "step")}
        self.scalars(record["step"], rest, prefix)
        self.scalars(record["step"], knn, "knn")
        name = "0 (untrained)" if record["epoch"] == 0 else record["epoch"]
        dist.print0(f"epoch {name}: {summary(record)}")

    def scalars(self, step: int, values: dict, prefix: str) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)


def lock(path: Path):
    """An exclusive lock on `path` (which holds this process's id) while the returned file is
    open; one error line if another process holds it."""
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise UserError(f"another process (pid {f.read().strip() or 'unknown'}) is writing "
                        f"{path.parent}: wait for it to end, stop it, or choose another "
                        "--output-dir") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def set_aside(out_dir: Path) -> None:
    """Move an earlier run's logs into out_dir/stopped-<time>/ (with a notice): a new start
    never appends to them."""
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


def describe_run(args) -> str:
    """For the start of a run: every flag as resolved, sorted, then one line with the recipe
    family and what the command line changed."""
    changed = ", ".join("--" + k.replace("_", "-") for k in args.explicit) or "nothing"
    flags = "\n".join(f"  {k}: {v}" for k, v in sorted(vars(args).items()))
    return (f"{flags}\nrecipe {args.recipe} ({args.dataset}, {args.image_size} px, mean "
            f"{args.mean}, std {args.std}); set on the command line: {changed}")


def learning_rate_rule(args, global_batch: int) -> str:
    """How the peak lr came about, for the start line."""
    if getattr(args, "base_learning_rate", None) is None or "learning_rate" in args.explicit:
        return "as given, not batch-scaled"
    return f"base {args.base_learning_rate:g} x {global_batch} / 256"


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
