"""Tests of common/: kNN, schedule, views, synthetic data, checkpoints, collectives."""
import math
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common import dist
import torchvision.transforms as T

from common.augment import View, colour_transforms
from common.knn import accuracy, nearest, vote
from common.synthetic import SyntheticShapes
from common.checkpoint import load_checkpoint, save_checkpoint
from common.errors import UserError
from common.train import warmup_cosine
from helpers import ROOT, fails, run_distributed
from pil_views import MultiView, pil_view


def test_knn_hand_checked_example():
    # bank: two class-0 points near the x axis, one class-1 point on the y axis
    bank = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    query = torch.tensor([[0.0, 1.0]])  # cos = 0, 0.196, 1 to the three bank points
    scores = vote(*nearest(query, bank, labels, k=2), temperature=0.5, num_classes=3)
    # top-2 neighbours: bank[2] (cos 1, class 1) and bank[1] (cos 0.2/sqrt(1.04), class 0)
    expected = torch.tensor([[math.exp(0.2 / math.sqrt(1.04) / 0.5), math.exp(2.0), 0.0]])
    torch.testing.assert_close(scores, expected)
    assert accuracy(scores, torch.tensor([1]), k=2) == {"top1": 100.0}  # no top-5 for k < 5


def test_knn_matches_naive_loop_across_chunks():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    queries = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    scores = vote(*nearest(queries, bank, labels, k=5, chunk=3), temperature=0.1,
                  num_classes=4)
    for i, q in enumerate(queries):
        sims = sorted(((float(q @ b), int(y)) for b, y in zip(bank, labels)), reverse=True)[:5]
        naive = [sum(math.exp(s / 0.1) for s, y in sims if y == c) for c in range(4)]
        torch.testing.assert_close(scores[i], torch.tensor(naive), rtol=1e-5, atol=1e-6)


def test_top5_counts_rank_five_and_needs_k_at_least_5():
    scores = torch.tensor([[6.0, 5, 4, 3, 2, 1], [1.0, 2, 3, 4, 5, 6]])
    labels = torch.tensor([4, 0])  # row 0: label at rank 5 (in top-5); row 1: rank 6
    assert accuracy(scores, labels, k=10) == {"top1": 0.0, "top5": 50.0}
    assert "top5" not in accuracy(scores, labels, k=4)


def test_warmup_cosine_known_points():
    assert warmup_cosine(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0) == pytest.approx(0.5)  # half-way through the cosine
    assert warmup_cosine(100, 100, 10, 1.0, final=0.1) == pytest.approx(0.1)


def _image():
    return SyntheticShapes(1, 32, seed=0)[0][0]


def test_views_of_one_image_differ_and_boxes_describe_the_crop():
    torch.manual_seed(0)
    views, boxes = MultiView([View(32, (0.5,) * 3, (0.25,) * 3)] * 4, with_boxes=True)(_image())
    assert len(views) == 4 and boxes.shape == (4, 5)
    assert all(not torch.equal(views[0], v) for v in views[1:])
    top, left, h, w, flipped = boxes.T
    assert ((top >= 0) & (left >= 0) & (top + h <= 1) & (left + w <= 1)).all()
    assert ((h * w >= 0.08 - 1e-6) & (h * w <= 1)).all() and set(flipped.tolist()) <= {0.0, 1.0}


def test_box_locates_the_crop_in_the_source_image():
    # a horizontal ramp: after a crop without colour ops, the left/right edge values of the view
    # are the ramp values at the box's left/right edges (mirrored when flipped)
    ramp = torch.linspace(0, 1, 64).expand(3, 64, 64)
    img = Image.fromarray((ramp.permute(1, 2, 0).numpy() * 255).astype("uint8"))
    view = View(32, (0.0,) * 3, (1.0,) * 3, jitter_p=0.0, gray_p=0.0)
    torch.manual_seed(1)
    for _ in range(5):
        x, (top, left, h, w, flipped) = pil_view(view, T.Compose(colour_transforms(view)), img)
        edges = (left / 64, (left + w) / 64)
        seen = (x[0, 16, 0].item(), x[0, 16, -1].item())
        seen = seen[::-1] if flipped else seen
        assert seen[0] == pytest.approx(edges[0], abs=0.05)
        assert seen[1] == pytest.approx(edges[1], abs=0.05)


def test_views_differ_across_workers_and_epochs():
    ds = torch.utils.data.Subset(SyntheticShapes(1, 32, 0, MultiView([View(32, (0.5,) * 3,
                                                                           (0.25,) * 3)])), [0] * 4)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    torch.manual_seed(0)
    epoch1 = [views[0] for views, _ in loader]
    epoch2 = [views[0] for views, _ in loader]
    assert not torch.equal(epoch1[0], epoch1[1])  # batch 0 and 1 come from different workers
    assert not torch.equal(epoch1[0], epoch2[0])


def test_synthetic_is_deterministic_and_labelled():
    a, b = SyntheticShapes(20, 24, seed=3), SyntheticShapes(20, 24, seed=3)
    assert a[5][0].tobytes() == b[5][0].tobytes() and a[5][1] == 5
    assert a[5][0].tobytes() != SyntheticShapes(20, 24, seed=4)[5][0].tobytes()
    assert a[5][0].size == (24, 24) and sorted(set(a.targets)) == list(range(10))


def test_checkpoint_save_is_atomic_and_load_checks(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"method": "mmcr", "x": torch.ones(2)}, path)

    def crash(obj, f):
        open(f, "wb").write(b"half")
        raise KeyboardInterrupt  # killed in the middle of the write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"method": "mmcr", "x": torch.zeros(2)}, path)
    assert torch.equal(load_checkpoint(path, "mmcr")["x"], torch.ones(2))
    with pytest.raises(UserError, match="comes from 'mmcr'"):
        load_checkpoint(path, "nnclr")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt", "mmcr")
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(tmp_path / "bad.pt", "mmcr")


def _collectives(rank, world):
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = dist.gather_with_grad(x)  # (2 * world, 3)
    weights = torch.arange(gathered.shape[0], dtype=torch.float32)[:, None]
    (gathered * weights).sum().backward()
    mean = dist.all_reduce_mean(torch.tensor([float(rank)]))
    return {"gathered": gathered.detach(), "grad": x.grad, "mean": mean,
            "plain": dist.gather(torch.tensor([rank]))}


def test_collectives_two_processes(tmp_path):
    results = run_distributed(_collectives, 2, tmp_path)
    expected = torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["gathered"], expected)
        # every rank's identical loss sends rows' weights back: summed over 2 ranks
        rows = torch.arange(2 * rank, 2 * rank + 2, dtype=torch.float32)[:, None]
        torch.testing.assert_close(r["grad"], 2 * rows.expand(2, 3))
        torch.testing.assert_close(r["mean"], torch.tensor([0.5]))
        assert r["plain"].tolist() == [0, 1]


FAULTS = """
import resource, sys, torch
from common.runtime import keep_freed_memory

def faults():  # minor page faults of the last of 8 rounds of 32, 64 and 96 MB tensors
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for n in (1, 2, 3):
            torch.ones(n * 2**23)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(faults(), keep_freed_memory(), faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", FAULTS], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    pages = 6 * 2**23 * 4 // resource.getpagesize()  # 192 MB touched per round
    assert int(out[0]) > 0.9 * pages  # by default every round faults on every page
    assert out[1] == "True" and int(out[2]) < 0.01 * pages


@pytest.mark.parametrize("recipe, mode, short", [("imagenet", Image.BILINEAR, 256),
                                                 ("stl10", Image.BICUBIC, 70)])
def test_eval_transform_resizes_with_the_references_interpolation(recipe, mode, short):
    # ImageNet: Resize(256) (bilinear) + CenterCrop(224) in the official MMCR, DenseCL and MSN
    # evaluations; STL-10: Resize(70, BICUBIC) + CenterCrop(64) (official MMCR)
    from types import SimpleNamespace
    from common.augment import eval_transform
    size = {"imagenet": 224, "stl10": 64}[recipe]
    args = SimpleNamespace(dataset="imagefolder", recipe=recipe, image_size=size, mean=[0, 0, 0],
                           std=[1, 1, 1])
    img = Image.fromarray(torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8).numpy())
    w = round(400 * short / 300)
    by_hand = img.resize((w, short), mode)
    top, left = round((short - size) / 2), round((w - size) / 2)
    by_hand = by_hand.crop((left, top, left + size, top + size))
    expected = torch.tensor(np.asarray(by_hand), dtype=torch.float32).permute(2, 0, 1)
    assert torch.allclose(eval_transform(args)(img) * 255, expected, atol=1e-3)


def test_images_of_every_mode_are_read_as_8_bit_rgb(tmp_path):
    # gray, gray + alpha, palette, RGBA, CMYK and 16-bit gray, as an image folder holds them;
    # the 16-bit ramp must keep its shape (PIL's own conversion clips it to white)
    from torchvision.transforms.functional import pil_to_tensor
    from common.folders import imagefolder
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
    ramp = (np.arange(48).reshape(8, 6) * 1365).astype(np.uint16)  # 0 .. 64155
    alpha = np.full((8, 6, 1), 128, np.uint8)
    images = {"gray.png": Image.fromarray(rgb[..., 0]),
              "gray-alpha.png": Image.fromarray(rgb[..., 0]).convert("LA"),
              "palette.png": Image.fromarray(rgb).convert("P"),
              "rgba.png": Image.fromarray(np.concatenate([rgb, alpha], 2)),
              "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
              "ramp16.png": Image.fromarray(ramp)}
    (tmp_path / "train" / "a").mkdir(parents=True)
    for name, img in images.items():
        img.save(tmp_path / "train" / "a" / name)
    ds = imagefolder(tmp_path, "train", pil_to_tensor, 0.2)
    read = {path.split("/")[-1]: ds[i][0] for i, path in enumerate(ds.paths)}
    assert all(x.shape == (3, 8, 6) and x.dtype == torch.uint8 for x in read.values())
    expected_ramp = torch.from_numpy((ramp >> 8).astype(np.uint8)).expand(3, 8, 6)
    assert torch.equal(read["ramp16.png"], expected_ramp)
    assert torch.equal(read["rgba.png"], torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(read["gray.png"], torch.from_numpy(rgb[..., 0]).expand(3, 8, 6))


def test_running_out_of_device_memory_is_one_line_with_what_to_lower(capsys):
    from common.errors import run_main

    def main(argv):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 ...")
    with pytest.raises(SystemExit) as e:
        run_main(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1, err
    assert "Tried to allocate 2.00 GiB" in err[0] and "--batch-size" in err[0]



def test_a_distributed_launch_without_local_rank_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")  # as a hand-made launch that sets RANK only
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    fails(lambda argv: dist.setup("cpu"), [], capsys, "LOCAL_RANK is not")

class BusError(torch.utils.data.Dataset):
    """A dataset whose worker dies as one does when /dev/shm is full (SIGBUS)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        os.kill(os.getpid(), signal.SIGBUS)


def test_a_dataloader_worker_killed_by_a_bus_error_is_one_line(capsys):
    from common.errors import run_main

    def main(argv):
        list(torch.utils.data.DataLoader(BusError(), num_workers=1))
    with pytest.raises(SystemExit) as e:
        run_main(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1, err
    assert "DataLoader worker" in err[0] and "--num-workers" in err[0] and "shm" in err[0]


class Failing(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise RuntimeError("a bug in the dataset")


def test_an_error_raised_in_a_dataloader_worker_keeps_its_traceback():
    from common.errors import run_main

    def main(argv):
        list(torch.utils.data.DataLoader(Failing(), num_workers=1))
    with pytest.raises(RuntimeError, match="a bug in the dataset"):
        run_main(main)
