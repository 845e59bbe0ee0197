"""Surviving a cluster: evaluation sharded over ranks equals one process, a dying rank does
not hang the others, and a finished run can be extended. The kills at random moments and
SIGTERM under torchrun, which need about a minute of process starts each, run from .ci/run
(tests/kill_resume.py, all four methods)."""
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Subset, TensorDataset

from common.checkpoint import load_checkpoint
from common.loaders import eval_loader
from common.dist import Dist
from common.knn import knn_eval
from common.errors import run_main
from helpers import ROOT, read_metrics, run_distributed, use_tiny_cnn
from mmcr import model as mmcr_model
from mmcr import pretrain

FLAGS = ["--dataset", "synthetic", "--image-size", "16", "--batch-size", "8", "--num-views",
         "2", "--num-workers", "0", "--eval-every", "0", "--dev", "96", "--max-epochs", "2"]


def _knn(rank, world, k):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(84, 3, 4, 4, generator=g), torch.randint(0, 4, (84,), generator=g)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(48, 8))
    d = Dist(rank, rank, world, torch.device("cpu"), rank == 0)
    ds = TensorDataset(images, labels)
    bank, test = eval_loader(Subset(ds, range(61)), 16, 0, d), \
        eval_loader(Subset(ds, range(61, 84)), 16, 0, d)
    return knn_eval(encoder, bank, test, k, 0.1, 4, torch.device("cpu"))


@pytest.mark.parametrize("k", [5, 40])  # 40 > a rank's 30 or 31 bank rows
def test_sharded_knn_equals_one_process(k, tmp_path):
    one = _knn(0, 1, k)
    assert run_distributed(_knn, 2, tmp_path, k) == [one, one]


FAILING_RANK = """
import sys
sys.path.insert(0, {root!r})
from common import dist
from common.errors import run_main
from mmcr import pretrain
step = pretrain.train_step
calls = []

def failing(*args):
    calls.append(1)
    if dist.rank() == 1 and len(calls) == 3:
        raise RuntimeError("rank 1 fails on purpose")
    return step(*args)

pretrain.train_step = failing
run_main(pretrain.main)
"""


def test_a_dying_rank_ends_the_others(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK.format(root=str(ROOT)))
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", str(script), "--device", "cpu", *FLAGS, "--dist-timeout", "1",
                           "--output-dir", str(tmp_path / "run")], cwd=ROOT, timeout=120,
                          capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and time.time() - start < 60
    err = proc.stderr
    assert "rank 1 fails on purpose" in err
    assert "error: another rank failed or stopped answering" in err, err


def test_a_finished_run_can_be_extended(tmp_path, monkeypatch, capsys):
    use_tiny_cnn(monkeypatch, mmcr_model)
    flags = [*FLAGS, "--max-epochs", "1", "--output-dir", str(tmp_path)]
    pretrain.main(flags)
    pretrain.main([*flags, "--resume", "auto", "--max-epochs", "3"])
    assert "extended from 1 to 3 epochs" in capsys.readouterr().out
    records = read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["step"] == 36
    assert load_checkpoint(tmp_path / "last.pt", "mmcr")["args"]["max_epochs"] == 3
    with pytest.raises(SystemExit) as exit_info:  # fewer epochs than trained: refused
        run_main(pretrain.main, [*flags, "--resume", "auto", "--max-epochs", "2"])
    assert exit_info.value.code == 2
    assert "has already trained 3 epochs" in capsys.readouterr().err


def _polls(rank, world):
    """Signals.poll() at 12 step boundaries of two ranks that run at different speeds, with a
    60 ms checkpoint timer; rank 1 receives SIGTERM during its 8th step."""
    import signal as signals_module
    from common.signals import Signals
    d = Dist(rank, rank, world, torch.device("cpu"), rank == 0)
    decisions = []
    with Signals(0.001, d) as signals:
        for step in range(12):
            time.sleep(0.03 if rank == 0 else 0.02)
            if rank == 1 and step == 7:
                os.kill(os.getpid(), signals_module.SIGTERM)
            decisions.append(signals.poll())
    return decisions


def test_ranks_agree_on_when_to_checkpoint_and_stop_without_waiting(tmp_path):
    # each step's flags are read at the next: both ranks decide alike, the signal's stop comes
    # one step after it, and a timed checkpoint resets the timer before the next flags go out
    # (no second checkpoint right after it)
    first, second = run_distributed(_polls, 2, tmp_path)
    assert first == second
    stops = [i for i, (stop, _) in enumerate(first) if stop]
    assert stops[0] == 8, first
    saves = [i for i, (_, save) in enumerate(first[:8]) if save]
    assert saves and all(b - a > 1 for a, b in zip(saves, saves[1:])), first
