"""When a run checkpoints part-way through an epoch, and when it stops: SIGTERM and SIGUSR1 (what
SLURM, Kubernetes and `timeout` send before a kill) and SIGINT (Ctrl-C) ask it to stop, the
--checkpoint-every timer asks for a checkpoint."""
import os
import signal
import time

import torch
import torch.distributed as dist

from common.errors import Preempted, kill_workers

EXIT_CODES = {signal.SIGTERM: 75, signal.SIGUSR1: 75, signal.SIGINT: 130}


class Signals:
    """Inside `with Signals(minutes, d) as signals:` a stop signal only sets a flag: the loop
    asks poll() at each step boundary, writes last.pt and raises stopped() (exit code 75, 130
    for Ctrl-C); a second signal ends the process at once, its loader workers with it. Under
    torchrun every rank must checkpoint (a collective) at the same step: each step's flags are
    all-reduced (max) on the CPU without waiting, and the result is read at the next step, so
    the ranks agree one step after the signal and no step waits for the others."""

    def __init__(self, minutes: float, d):
        self.minutes, self.last = minutes, time.monotonic()
        self.received, self.agreed, self.pending = 0, 0, None
        self.distributed = d.world_size > 1  # then a gloo group: the flags stay on the CPU
        self.group = dist.new_group(backend="gloo") if self.distributed and \
            dist.get_backend() != "gloo" else None

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in EXIT_CODES}
        return self

    def __exit__(self, kind, error, traceback):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.pending and error is None:  # every rank has the same one outstanding
            self.pending[0].wait()

    def handle(self, signum, frame):
        if self.received:
            kill_workers()
            os._exit(128 + signum)
        self.received = signum

    def poll(self) -> tuple[bool, bool]:
        """(stop, checkpoint) at this step boundary, the same on every rank: a stop signal
        arrived (stop and checkpoint), or --checkpoint-every minutes passed (checkpoint)."""
        if not self.distributed:
            self.agreed, due = self.received, self.due()
        elif self.pending is None:
            self.agreed, due = 0, False
        else:  # what every rank sent at the last step (max: the signal number, if any)
            self.pending[0].wait()
            self.agreed, due = self.pending[1].tolist()
        if self.agreed or due:
            self.last = time.monotonic()
        if self.distributed:  # this step's flags, read at the next
            flags = torch.tensor([self.received, self.due()], dtype=torch.int32)
            self.pending = (dist.all_reduce(flags, dist.ReduceOp.MAX, self.group,
                                            async_op=True), flags)
        return bool(self.agreed), bool(self.agreed or due)

    def due(self) -> bool:
        """Whether --checkpoint-every minutes passed since the last checkpoint."""
        return self.minutes > 0 and time.monotonic() - self.last >= 60 * self.minutes

    def stopped(self, step: int, epoch: int, batch: int) -> Preempted:
        """The exception that ends a run stopped by a signal, after its checkpoint."""
        code = EXIT_CODES.get(self.agreed, 75)
        return Preempted(f"a signal arrived: last.pt holds step {step} (epoch {epoch + 1}, batch "
                         f"{batch}); continue with the same command and --resume auto (exit "
                         f"code {code})", code)
