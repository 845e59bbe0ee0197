"""A run never hangs (a script, which .ci/run runs for all four methods: each case needs a few
seconds of process start, too long for the suite). On an image folder decoded by 2 DataLoader
workers, each in a process group of its own, as a shell runs it:
- ctrl-c: SIGINT to the group once training runs; the run must write last.pt at the step
  boundary and exit with code 130;
- ctrl-c twice: a second SIGINT right after the first ends it at once;
- main: an error raised in the main process (in the third step) ends it with its traceback;
- worker: an error raised in a loader worker ends it with its traceback.
Each within 10 s of the signal or the error, and with no process of its group left: the
workers, which ignore the stop signals, are gone too.

    python tests/interrupt.py --method all
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from kill_resume import FLAGS, SMALL, image_folder  # noqa: E402

LIMIT = 10.0  # seconds from the signal or the error to the end of the whole group
RUN = """
import sys, time
sys.path.insert(0, {root!r})
import importlib
import torch
from common import loaders
from common.errors import run_main
pretrain = importlib.import_module("{method}.pretrain")
step, decode, calls = pretrain.train_step, loaders.pil_to_tensor, []

def faulty_step(*args):  # the main process's error, or a slow step to be interrupted in
    calls.append(1)
    if "{fault}" == "main" and sum(calls) == 3:
        print("failing now", flush=True)
        raise RuntimeError("a bug in the step")
    time.sleep(0.2)
    return step(*args)

def faulty_decode(image):  # a worker's error, at its 20th image (training has started)
    calls.append(0)
    if "{fault}" == "worker" and torch.utils.data.get_worker_info() and len(calls) == 20:
        print("failing now", flush=True)
        raise RuntimeError("a bug in the decoder")  # not a decode error: nothing skips it
    return decode(image)

pretrain.train_step, loaders.pil_to_tensor = faulty_step, faulty_decode
run_main(pretrain.main)
"""


def group_alive(proc: subprocess.Popen) -> bool:
    """Whether any process of proc's group runs (proc itself reaped first, once it ended)."""
    try:
        proc.poll()
        os.killpg(proc.pid, 0)
        return True
    except ProcessLookupError:
        return False


def case(method: str, fault: str, tmp: Path) -> str:
    """Run one case; returns what happened, or raises AssertionError."""
    script, log, run = tmp / f"{fault}.py", tmp / f"{fault}.log", tmp / f"run-{fault}"
    script.write_text(RUN.format(root=str(ROOT), method=method, fault=fault))
    flags = [*FLAGS, "--data-dir", str(tmp / "data"), "--max-epochs", "3",
             "--checkpoint-every", "0", *SMALL[method], "--output-dir", str(run)]
    proc = subprocess.Popen([sys.executable, str(script), *flags], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    trigger = "failing now" if fault in ("main", "worker") else "epoch 1/3:"
    while trigger not in log.read_text():
        assert proc.poll() is None, f"{fault}: ended before the case began:\n{log.read_text()}"
        time.sleep(0.05)
    if fault.startswith("ctrl-c"):
        time.sleep(0.5)  # a few steps in
        os.killpg(proc.pid, signal.SIGINT)
        if fault == "ctrl-c twice":
            time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
    start = time.time()
    while group_alive(proc) and time.time() - start < LIMIT:
        time.sleep(0.05)
    seconds, alive = time.time() - start, group_alive(proc)
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    code, text = proc.wait(), log.read_text()
    assert not alive, f"{method} {fault}: its group still ran {LIMIT:.0f} s later:\n{text}"
    if fault == "ctrl-c":
        held = torch.load(run / "last.pt", weights_only=True)["step"]
        assert code == 130 and f"last.pt holds step {held} " in text, f"exit {code}:\n{text}"
        return f"ctrl-c: last.pt at step {held}, exit 130, group gone {seconds:.1f} s later"
    if fault == "ctrl-c twice":
        assert code == 130, f"{method} {fault}: exit {code}:\n{text}"
        return f"ctrl-c twice: exit 130, group gone {seconds:.1f} s later"
    bug = "a bug in the step" if fault == "main" else "a bug in the decoder"
    assert code == 1 and "Traceback" in text and bug in text, f"exit {code}:\n{text}"
    return f"error in the {fault}: traceback, exit 1, group gone {seconds:.1f} s later"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True, choices=[*SMALL, "all"])
    methods = list(SMALL) if p.parse_args().method == "all" else [p.parse_args().method]
    for method in methods:
        with tempfile.TemporaryDirectory() as tmp:
            image_folder(Path(tmp) / "data", 96)
            found = [case(method, fault, Path(tmp))
                     for fault in ("ctrl-c", "ctrl-c twice", "main", "worker")]
        print(f"{method}: " + "; ".join(found), flush=True)


if __name__ == "__main__":
    main()
