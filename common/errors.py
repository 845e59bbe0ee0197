"""How a script ends: bad input is one line and exit code 2; a non-finite loss, memory running
out (the device's, or a DataLoader worker's) or a failed peer exit code 1; a stop signal (after
its checkpoint) exit code 75, or 130 for Ctrl-C. However it ends, its DataLoader workers end
with it."""
import multiprocessing
import sys

import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input: the scripts print the message as one line and exit with code 2."""


class NonFiniteLoss(Exception):
    """The loss went NaN/inf: the run stops with exit code 1; the last checkpoint is untouched."""


class Preempted(Exception):
    """A signal stopped the run at a step boundary, after its checkpoint: exit code `code`."""

    def __init__(self, message: str, code: int = 75):
        super().__init__(message)
        self.code = code


def run_main(main, argv=None) -> None:
    """Run a script's main(argv), turning UserError, NonFiniteLoss, an out-of-memory error, a
    dead DataLoader worker, a failed peer and Preempted into one line and an exit code (2, 1,
    1, 1, 1, 75 or 130); any other error keeps its traceback. Either way the DataLoader workers
    are killed on the way out: they ignore the stop signals (common/loaders.py), so Python's
    own exit, which terminates them with SIGTERM and then waits, would wait forever."""
    try:
        main(argv)
    except UserError as e:
        stop(f"error: {e}", 2)
    except NonFiniteLoss as e:
        stop(f"error: {e}", 1)
    except Preempted as e:
        stop(f"stopped: {e}", e.code)
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
    finally:
        kill_workers()


def kill_workers() -> None:
    """SIGKILL this process's daemonic children, its DataLoader workers (they hold nothing that
    needs saving), and reap them."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


def stop(line: str, code: int) -> None:
    """`line` on stderr, then exit with `code`."""
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def peer_failure(e: Exception) -> bool:
    """A collective that failed because a peer process died or timed out: gloo raises a
    RuntimeError naming itself, NCCL a DistError."""
    return dist.is_initialized() and (isinstance(e, dist.DistError) or "gloo" in str(e).lower())
