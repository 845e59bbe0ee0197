"""NNCLR's two views of real images made by the device executor and by the PIL reference
(tests/pil_views.py), compared as pairs: statistics of each view and the likeness of the two
views of one image (in pixels, and in an untrained ResNet-18's features), each a two-sample
Kolmogorov-Smirnov distance over many draws and a difference of means in standard errors.
test_views.py checks each op; this checks what a contrastive loss sees, the joint distribution
of a pair.

    python tests/view_pairs.py                                   # the shared CIFAR-10 images
    python tests/view_pairs.py --data-dir DIR --images 500 --draws 8
"""
import argparse
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.backbone import resnet  # noqa: E402
from common.data import FAMILY_STATS  # noqa: E402
from common.device_views import BatchViews  # noqa: E402
from common.folders import is_image  # noqa: E402
from nnclr.pretrain import pretrain_views  # noqa: E402
from pil_views import MultiView  # noqa: E402


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest gap between the empirical CDFs of two samples."""
    grid = torch.cat([a, b]).unique()
    cdf = [torch.searchsorted(x.sort().values, grid, right=True) / len(x) for x in (a, b)]
    return float((cdf[0] - cdf[1]).abs().max())


def ks_limit(n: int, m: int) -> float:
    """Critical KS distance at alpha = 0.001 for samples of n and m."""
    return 1.95 * math.sqrt((n + m) / (n * m))


def pairs(images, views, draws: int):
    """(view 1, view 2), each (draws x N, 3, 32, 32), from the PIL and the device executor."""
    pil = MultiView(views)
    made = [pil(img) for _ in range(draws) for img in images]
    by_pil = [torch.stack(v) for v in zip(*made)]
    u8 = torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1) for img in images])
    batch = (u8, torch.tensor([u8.shape[2:]] * len(u8)), torch.zeros(len(u8)))
    device = BatchViews(views)
    made = [device(batch)[0] for _ in range(draws)]
    return by_pil, [torch.cat(v) for v in zip(*made)]


@torch.no_grad()
def statistics(v1, v2, net) -> dict:
    centred = [F.normalize((v - v.mean((1, 2, 3), keepdim=True)).flatten(1), dim=1)
               for v in (v1, v2)]
    f1, f2 = (F.normalize(torch.cat([net(c) for c in v.split(500)]), dim=1) for v in (v1, v2))
    out = {"pixel cosine of the pair": (centred[0] * centred[1]).sum(1),
           "feature cosine of the pair": (f1 * f2).sum(1)}
    for i, v in enumerate((v1, v2), 1):
        out[f"view {i} mean"], out[f"view {i} std"] = v.mean((1, 2, 3)), v.std((1, 2, 3))
        out[f"view {i} chroma"] = (v.amax(1) - v.amin(1)).mean((1, 2))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/cifar10-5k"),
                   help="a folder of 32 px images, searched recursively")
    p.add_argument("--images", type=int, default=500, help="images drawn from the folder")
    p.add_argument("--draws", type=int, default=8, help="pairs made of each image per executor")
    p.add_argument("--seed", type=int, default=0, help="seed of the image sample and the views")
    args = p.parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    files = sorted(f for f in Path(args.data_dir).rglob("*") if is_image(f.name))
    images = [Image.open(f).convert("RGB") for f in random.sample(files, args.images)]
    size, mean, std = FAMILY_STATS["cifar"]
    views = pretrain_views(SimpleNamespace(recipe="cifar", image_size=size, mean=mean, std=std))
    by_pil, by_device = pairs(images, views, args.draws)
    net = resnet("resnet18", "cifar", size).eval()  # untrained: a fixed random feature map
    ours, ref = statistics(*by_device, net), statistics(*by_pil, net)
    n = len(by_pil[0])
    print(f"{n} pairs per executor ({args.images} images x {args.draws} draws); KS limit at "
          f"alpha 0.001: {ks_limit(n, n):.4f}")
    for key in ref:
        a, b = ref[key], ours[key]
        z = (b.mean() - a.mean()) / (a.var() / n + b.var() / n).sqrt()
        print(f"{key:28s} pil {a.mean():+.4f}  device {b.mean():+.4f}  difference "
              f"{z:+.1f} s.e.  KS {ks_distance(a, b):.4f}")


if __name__ == "__main__":
    main()
