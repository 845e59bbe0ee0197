"""README's sbatch script under a stand-in SLURM (a script; .ci/run runs it): the script as
README prints it, with small data, 2 gloo ranks on one node and the default loader workers.
The stand-in does what SLURM does: it starts the batch script in a process group of its own,
sends SIGUSR1 to the batch shell alone (--signal=B:USR1), SIGKILLs the whole group if it
is still there after the grace period (the time limit), and starts the script again if it
asked for a requeue. `srun` runs its command (one task on the one node) and `scontrol` knows
the node's name and records the requeue. The requeued run must resume at the step that the
signal reached and end with the weights and buffers of an uninterrupted run, bit for bit.

    python tests/sbatch_requeue.py
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the repository, as every test script
from helpers import free_port  # noqa: E402
from kill_resume import image_folder  # noqa: E402

GRACE = 90  # seconds from USR1 to SIGKILL (SLURM's --signal=B:USR1@300 gives 300)
SMALL = ["--device", "cpu", "--image-size", "16", "--batch-size", "8", "--num-views", "2",
         "--eval-every", "0", "--max-epochs", "2", "--checkpoint-every", "0"]
SRUN = '#!/bin/bash\nexec "$@"\n'  # one task on one node: the command itself
SCONTROL = """#!/bin/bash
case "$1" in
  show) echo 127.0.0.1 ;;                 # scontrol show hostnames: the one node
  requeue) echo "$2" >> "$REQUEUES" ;;    # scontrol requeue <job id>
esac
"""


def readme_script() -> str:
    """The sbatch script of README.md."""
    scripts = re.findall(r"```bash\n(#!/bin/bash\n.*?)```", (ROOT / "README.md").read_text(),
                         flags=re.S)
    assert len(scripts) == 1, "README.md should show one sbatch script"
    return scripts[0]


def adapt(script: str, data: Path, out: Path, port: int) -> str:
    """README's script on this machine: 2 CPU ranks, the small image folder, `out`."""
    swaps = [("--nproc_per_node 8", "--nproc_per_node 2"), (":29500", f":{port}"),
             ("--data-dir /data/imagenet", f"--data-dir {data} {' '.join(SMALL)}"),
             ("runs/mmcr/imagenet", str(out))]
    for old, new in swaps:
        assert script.count(old) == 1, f"README's sbatch script no longer holds '{old}'"
        script = script.replace(old, new)
    return script


def stand_in_slurm(tmp: Path) -> dict:
    """The environment of a job: srun and scontrol stand-ins first on PATH."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
            "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node0", "REQUEUES": str(tmp / "requeues"),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(script: Path, env: dict, log: Path) -> subprocess.Popen:
    """sbatch: the batch script in a process group of its own, its output appended to `log`."""
    return subprocess.Popen(["bash", str(script)], cwd=ROOT, env=env, stdout=open(log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def signal_then_kill(job: subprocess.Popen, log: Path) -> float:
    """Once training has run a second, USR1 to the batch shell, then SIGKILL to the group if it
    outlives GRACE. Returns the seconds from the signal to the batch shell's exit."""
    while "epoch 1/2:" not in log.read_text():
        if job.poll() is not None:
            raise SystemExit(f"the job ended before training started:\n{log.read_text()}")
        time.sleep(0.05)
    time.sleep(1.0)
    signalled = time.time()
    job.send_signal(signal.SIGUSR1)
    try:
        job.wait(GRACE)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        raise SystemExit(f"the job outlived the {GRACE} s grace period:\n{log.read_text()}")
    return time.time() - signalled


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, run, log = image_folder(tmp / "data", 192), tmp / "run", tmp / "log"
        env = stand_in_slurm(tmp)
        script = tmp / "job.sh"
        script.write_text(adapt(readme_script(), data, run, free_port()))
        straight = tmp / "straight.sh"
        straight.write_text(adapt(readme_script(), data, tmp / "straight", free_port())
                            .replace("trap ", "# trap "))  # no signal: runs through
        if start(straight, env, tmp / "straight.log").wait() != 0:
            raise SystemExit((tmp / "straight.log").read_text())
        seconds = signal_then_kill(start(script, env, log), log)
        first = log.read_text()
        step = torch.load(run / "last.pt", weights_only=True)["step"]
        total = torch.load(tmp / "straight" / "last.pt", weights_only=True)["step"]
        assert (tmp / "requeues").read_text().split() == ["4242"], "no requeue"
        assert 0 < step < total, f"last.pt at step {step} of {total}"
        assert first.count("(exit code 75)") == 2, first  # both ranks checkpointed and stopped
        if start(script, env, log).wait() != 0:
            raise SystemExit(log.read_text())
        second = log.read_text()[len(first):]
        assert f" at step {step} (" in second.split("resumed ", 1)[1].splitlines()[0], second
        assert (tmp / "requeues").read_text().split() == ["4242"], "requeued twice"
        a, b = (torch.load(r / "last.pt", weights_only=True)["model"]
                for r in (tmp / "straight", run))
        differ = [k for k in a if not torch.equal(a[k], b[k])]
    print(f"sbatch script: USR1 at step {step} of {total}, batch shell gone {seconds:.1f} s "
          f"later; requeued, resumed at step {step}; {len(a) - len(differ)} of {len(a)} tensors "
          "equal to the uninterrupted run's" + (f"; differ: {differ[:5]}" if differ else ""))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
