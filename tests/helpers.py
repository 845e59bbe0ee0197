"""Test helpers: multi-process gloo runs, the scripts as subprocesses, and profiled steps."""
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

from common.errors import run_main

PREEMPTED = 75  # the exit code of a run stopped by SIGTERM after its checkpoint

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, tmp_path, *args) -> list:
    """Run fn(rank, world, *args) in `world` gloo processes; returns each rank's result.
    The processes are forked: they inherit the imported modules, where a spawned one spends
    about 9 s of 2 cores importing torch and torchvision."""
    mp.start_processes(_worker, (world, free_port(), fn, args, str(tmp_path)), nprocs=world,
                       start_method="fork")
    return [torch.load(Path(tmp_path) / f"{r}.pt", weights_only=False) for r in range(world)]


def run_script(script: str, *flags, timeout: int = 300, env=None) -> subprocess.CompletedProcess:
    """`python <script> <flags>` from the repository root, as a user runs it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, script, *map(str, flags)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def fails(main, argv, capsys, match: str) -> str:
    """main(argv), run as the scripts run it, must print one error line containing `match` and
    exit with code 2; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and match in err, err
    return err


class Killed(Exception):
    """Stands for a kill -9 in the middle of training."""


def straight_and_resumed(pretrain, flags, tmp_path, monkeypatch, steps: int = 8):
    """Runs pretrain.main(flags) (a run of `steps` steps) once straight through, and once
    stopped twice at random steps and continued with --resume auto each time: first by SIGTERM
    to this process during a step, after which the run must finish that step, write last.pt
    there and exit with code 75; then by a kill in the middle of a later step (last.pt stays
    where it was). Returns (straight last.pt, resumed last.pt, (the step the signal stopped
    at, the step last.pt held at the kill)); tests/kill_resume.py does the same with real
    processes and signals."""
    pretrain.main([*flags, "--output-dir", str(tmp_path / "straight")])
    run = [*flags, "--output-dir", str(tmp_path / "run")]
    step_once, rng = pretrain.train_step, random.Random()

    def stop_at(call: int, stop):
        calls = []

        def step(*args):
            if len(calls) == call:
                stop()
            calls.append(1)
            return step_once(*args)
        monkeypatch.setattr(pretrain, "train_step", step)

    def kill():
        raise Killed

    signalled = rng.randrange(1, steps - 2)  # steps done before the one the signal arrives in
    stop_at(signalled, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stopped:
        run_main(pretrain.main, run)
    held = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"]
    assert stopped.value.code == PREEMPTED and held == signalled + 1, (signalled, held)
    stop_at(rng.randrange(1, steps - held), kill)
    with pytest.raises(Killed):
        pretrain.main([*run, "--resume", "auto"])
    at_kill = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"]
    monkeypatch.setattr(pretrain, "train_step", step_once)
    pretrain.main([*run, "--resume", "auto"])
    return (torch.load(tmp_path / "straight" / "last.pt", weights_only=True),
            torch.load(tmp_path / "run" / "last.pt", weights_only=True), (held, at_kill))


def load_into_torchvision_resnet18(path):
    """load_state_dict(strict=False) result of a backbone.pt in torchvision's resnet18 with
    the CIFAR stem (3x3 stride-1 conv1, no max-pool)."""
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    return net.load_state_dict(torch.load(path, weights_only=True), strict=False)


TINY_FEATURES = 64


class TinyCNN(torch.nn.Module):
    """Three conv-BN-ReLU stages (stride 4, TINY_FEATURES channels) with resnet()'s signature,
    output (B, TINY_FEATURES) and the ResNet attribute names densecl.model.feature_map reads:
    swapped in for the ResNet where a test needs ~100 training steps in seconds on a CPU."""

    def __init__(self, arch="resnet18", stem="cifar", image_size=16, zero_init_residual=False):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32)
        self.relu, self.maxpool, self.layer4 = nn.ReLU(inplace=True), nn.Identity(), nn.Identity()
        self.layer1, self.layer2, self.layer3 = (nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())
            for c_in, c_out, stride in ((32, 32, 1), (32, 64, 2), (64, TINY_FEATURES, 2)))

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return x.mean((2, 3))  # (B, TINY_FEATURES)


def use_tiny_cnn(monkeypatch, model_module) -> None:
    """Make `model_module` (a method's model.py) build TinyCNN where it builds a resnet18."""
    monkeypatch.setattr(model_module, "resnet", TinyCNN)
    monkeypatch.setitem(model_module.FEATURE_DIM, "resnet18", TINY_FEATURES)


def read_metrics(run_dir) -> list:
    """The records of a run directory's metrics.jsonl, one dict per epoch."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def resolved(args, expected: dict) -> bool:
    """args holds each value of `expected`: floats within pytest.approx's tolerance, the rest
    (strings, lists, None) exactly."""
    return {k: getattr(args, k) for k in expected} == \
        {k: pytest.approx(v) if isinstance(v, float) else v for k, v in expected.items()}


SYNCING = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero"}
# regions whose reads are of host tensors, not of the device: the loader decoding images on the
# host, and torch's own optimizers reading their step counters (CPU tensors unless fused on a
# GPU); and the one read a method's maths makes: torch checks the SVD's convergence flag
# (MMCR's nuclear norms, as in the official code and lightly's loss)
HOST_OR_INHERENT = ("enumerate(DataLoader)", "Optimizer.step#Adam.step",
                    "Optimizer.step#AdamW.step", "Optimizer.step#SGD.step", "aten::linalg_svdvals")


@contextlib.contextmanager
def marked_steps(train_step_owner):
    """Within the block, each call of train_step_owner.train_step is a profiler range named
    "train_step"."""
    from torch.profiler import record_function
    real = train_step_owner.train_step

    def marked(*args, **kwargs):
        with record_function("train_step"):
            return real(*args, **kwargs)
    train_step_owner.train_step = marked
    try:
        yield
    finally:
        train_step_owner.train_step = real


def profile_steps(run, train_step_owner, first: int = 2, last: int = 5) -> dict:
    """Run `run()` under torch.profiler on the CPU, each call of train_step_owner.train_step
    marked. Per loop iteration from the start of step `first` to that of step `last` (a step,
    its bookkeeping and the next step's views): "loop_ops" and, within train_step, "step_ops",
    the aten ops called from Python or autograd, less the loader's (it decodes on the host);
    "syncs" {synchronising op: count} outside HOST_OR_INHERENT."""
    from torch.profiler import ProfilerActivity, profile
    with marked_steps(train_step_owner), profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.events()
    marks = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.name == "train_step")
    window = [e for e in events if marks[first][0] <= e.time_range.start < marks[last][0]]
    steps, found = last - first, {"loop_ops": 0, "step_ops": 0, "syncs": {}}
    for e in window:
        parents, p = [], e.cpu_parent
        while p is not None:
            parents.append(p.name)
            p = p.cpu_parent
        if e.name.startswith("aten::") and not (parents and parents[0].startswith("aten::")) \
                and not any(p.startswith("enumerate(DataLoader)") for p in parents):
            found["loop_ops"] += 1 / steps
            found["step_ops"] += any(a <= e.time_range.start < b for a, b in marks) / steps
        if e.name in SYNCING and not any(p.startswith(HOST_OR_INHERENT) for p in parents):
            key = f"{e.name} in {parents[0] if parents else 'python'}"
            found["syncs"][key] = found["syncs"].get(key, 0) + 1 / steps
    return found
