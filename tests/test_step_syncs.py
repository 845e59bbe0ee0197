"""A step that does not log reads nothing back from the device (the CPU proxy of a GPU that
never waits for Python): the real loop of each method, profiled on the CPU, calls no
synchronising op (item, _local_scalar_dense, nonzero, is_nonzero) between two steps, views
and bookkeeping included, except where the host reads its own tensors (helpers.HOST_OR_INHERENT)."""
import pytest

from helpers import profile_steps, use_tiny_cnn

QUIET = ["--dataset", "synthetic", "--image-size", "16", "--dev", "64", "--batch-size", "8",
         "--max-epochs", "1", "--num-workers", "0", "--eval-every", "0", "--log-every", "1000",
         "--checkpoint-every", "0"]
METHODS = {
    "mmcr": ["--num-views", "4", "--ema", "0.99"],
    "nnclr": ["--queue-size", "16", "--hidden-dim", "32", "--pred-hidden-dim", "32",
              "--projection-dim", "16"],
    "densecl": ["--queue-size", "16", "--bn-splits", "2", "--hidden-dim", "32"],
    "msn": ["--arch", "vit_tiny", "--depth", "1", "--patch-size", "4", "--focal-views", "2",
            "--num-prototypes", "16", "--hidden-dim", "32"],
}


@pytest.mark.parametrize("method", METHODS)
def test_a_step_that_does_not_log_reads_nothing_back(method, tmp_path, monkeypatch):
    import importlib
    pretrain = importlib.import_module(f"{method}.pretrain")
    if method != "msn":
        use_tiny_cnn(monkeypatch, importlib.import_module(f"{method}.model"))
    flags = [*QUIET, *METHODS[method], "--output-dir", str(tmp_path)]
    found = profile_steps(lambda: pretrain.main(flags), pretrain)
    assert found["syncs"] == {} and found["step_ops"] > 0, found
