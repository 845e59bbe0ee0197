"""How a script ends: bad input is one line and exit code 2; a non-finite loss, memory running
out (the device's, or a DataLoader worker's) or a failed peer exit code 1; a preemption signal
(after its checkpoint) exit code 75."""
import sys

import torch
import torch.distributed as dist

PREEMPTED = 75  # exit code of a run stopped by SIGTERM/SIGUSR1 after writing last.pt


class UserError(Exception):
    """Bad input: the scripts print the message as one line and exit with code 2."""


class NonFiniteLoss(Exception):
    """The loss went NaN/inf: the run stops with exit code 1; the last checkpoint is untouched."""


class Preempted(Exception):
    """A signal stopped the run at a step boundary, after its checkpoint: exit code 75."""


def run_main(main, argv=None) -> None:
    """Run a script's main(argv), turning UserError, NonFiniteLoss, an out-of-memory error, a
    dead DataLoader worker, a failed peer and Preempted into one line and an exit code (2, 1,
    1, 1, 1, 75)."""
    try:
        main(argv)
    except UserError as e:
        stop(f"error: {e}", 2)
    except NonFiniteLoss as e:
        stop(f"error: {e}", 1)
    except Preempted as e:
        stop(f"stopped: {e}", PREEMPTED)
    except torch.OutOfMemoryError as e:
        stop(f"error: the device ran out of memory ({str(e).splitlines()[0][:120]}): lower "
             "--batch-size (images per process) or the number or size of the views, or use "
             "--precision bf16; the last checkpoint, if any, is untouched", 1)
    except RuntimeError as e:
        if "DataLoader worker (pid" in str(e):  # killed: bus error (/dev/shm full), OOM killer
            stop(f"error: {str(e).splitlines()[0][:120]}: lower --num-workers or --batch-size, "
                 "or give the machine more shared memory (/dev/shm; docker run --shm-size 8g); "
                 "continue with --resume auto", 1)
        if not peer_failure(e):
            raise
        stop(f"error: another rank failed or stopped answering ({str(e).splitlines()[0][-160:]}"
             "); its own error is above", 1)


def stop(line: str, code: int) -> None:
    """`line` on stderr, then exit with `code`."""
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def peer_failure(e: Exception) -> bool:
    """A collective that failed because a peer process died or timed out: gloo raises a
    RuntimeError naming itself, NCCL a DistError."""
    return dist.is_initialized() and (isinstance(e, dist.DistError) or "gloo" in str(e).lower())
