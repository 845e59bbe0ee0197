"""Throughput benchmark (not a test): images/s of the data pipeline and of the training step,
measured separately, and peak memory, for one method at its default settings.

    python tests/benchmark.py --method mmcr                       # default device, defaults
    python tests/benchmark.py --method nnclr --device cpu --steps 5 -- --batch-size 32

Flags after `--` go to the method's pretrain.py (dataset: synthetic unless given). The step
figure excludes data-loading waits; the data figure runs the loader alone with
--num-workers workers. Peak memory: CUDA max allocated, or the process's peak RSS on CPU.
"""
import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.data import dataset_info, load_split


def data_images_per_s(module, args, steps: int) -> float:
    """Images/s of dataset + views + collation alone (first batch not timed: worker start)."""
    info = dataset_info(args)
    ds = load_split(info, args.data_dir, "pretrain", module.view_transform(args, info), args.seed)
    loader = torch.utils.data.DataLoader(ds, args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.num_workers)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * args.batch_size / (time.perf_counter() - start)


def step_record(module, flags, steps: int, batch_size: int) -> dict:
    """Runs pretrain.py for one epoch of `steps` steps and returns its metrics.jsonl record."""
    with tempfile.TemporaryDirectory() as out:
        module.main([*flags, "--max-epochs", "1", "--eval-every", "0", "--log-every", "1000",
                     "--dev", str((steps + 1) * batch_size), "--output-dir", out])
        return json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="mmcr", choices=["mmcr", "msn", "densecl", "nnclr"])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--steps", type=int, default=10, help="timed steps / batches")
    p.add_argument("rest", nargs="*", help="pretrain.py flags (after --)")
    bench = p.parse_args()
    module = importlib.import_module(f"{bench.method}.pretrain")
    flags = ["--dataset", "synthetic", "--device", bench.device, *bench.rest]
    if "--dataset" in bench.rest:
        flags = flags[2:]
    args = module.get_args(flags)
    data = data_images_per_s(module, args, bench.steps)
    record = step_record(module, flags, bench.steps, args.batch_size)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and bench.device != "cpu"\
        else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{bench.method} on {device}: batch {args.batch_size}, {args.num_workers} workers")
    print(f"  data pipeline  {data:8.1f} images/s")
    print(f"  training step  {record['step_images_per_s']:8.1f} images/s "
          f"(end to end {record['images_per_s']:.1f})")
    print(f"  peak memory    {record['peak_memory_mb']:8.0f} MiB")


if __name__ == "__main__":
    main()
