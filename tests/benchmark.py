"""Speed benchmark (not a test), every figure from one run on this machine:

1. views/s of the view pipeline on 32 px images held in one array, as CIFAR's are: the device
   views as pretrain.py makes them (batches sliced from the array, BatchViews on --device)
   against the PIL views of tests/pil_views.py in --num-workers DataLoader workers (the
   reference, and what a plain script does); loader and view making timed together, at the
   batch of the step comparison and at the method's default batch, and the device's view
   making alone; each figure the fastest of three runs of a third of --views;
2. training-step images/s, ours against a peer's step on the same work: the same backbone,
   batch, views, precision and threads, inputs already in memory. The peer is the step of
   lightly's examples (examples/pytorch/<method>.py) built from lightly's heads, losses and
   memory banks; it runs when lightly is installed (pip install lightly; only for this
   benchmark, never a dependency of the scripts). Ours is the method's own train_step, timed
   inside a real one-epoch pretrain.py run. On a GPU also at the recipe's default batch;
3. aten ops per step (those called from Python or autograd, as torch.profiler counts them):
   ours within train_step and for the whole loop iteration (views and bookkeeping too), beside
   the peer's step, and our synchronising ops outside the host's own tensors (helpers.py);
4. on a GPU: the share of our step's wall time in which the GPU runs kernels, and the peak
   GPU memory of the run.
The first --warmup steps of each are not timed.

    python tests/benchmark.py                                   # all four methods, CPU
    python tests/benchmark.py --device cuda --precision bf16 --steps 20 --threads 8 --num-workers 12
"""
import argparse
import copy
import importlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms.functional import pil_to_tensor  # noqa: E402

from common.backbone import resnet  # noqa: E402
from common.loaders import ArrayImages, array_images  # noqa: E402
from common.device_views import BatchViews  # noqa: E402
from common.synthetic import SyntheticShapes  # noqa: E402
from common.runtime import keep_freed_memory  # noqa: E402
from densecl.model import feature_map  # noqa: E402
from helpers import marked_steps, profile_steps  # noqa: E402
from pil_views import MultiView  # noqa: E402

# the work of each comparison (the settings the issue measured), as pretrain.py flags
WORK = {"mmcr": ["--batch-size", "32", "--num-views", "4", "--ema", "0.99",
                 "--lmbda", "5e-3"],
        "nnclr": ["--batch-size", "64"],
        "densecl": ["--batch-size", "64"],
        "msn": ["--batch-size", "32"]}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class InMemory(torch.utils.data.Dataset):
    """32 px images held as torchvision's CIFAR-10 holds them, one uint8 array N x H x W x 3
    with a PIL image made per item, so the views/s figure measures the view pipeline, not the
    image source."""

    def __init__(self, n: int, transform):
        shapes = SyntheticShapes(n, 32, 0)
        self.data = torch.stack([pil_to_tensor(shapes[i][0]) for i in range(n)]).permute(0, 2, 3, 1)
        self.data, self.targets = self.data.numpy(), shapes.targets
        self.transform = transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def best_rate(step, batches: int, views: int, device, repeats: int = 3) -> float:
    """Views per second of the fastest of `repeats` runs of `batches` calls of step, each
    making `views` views: the run least disturbed by other work on the machine (as timeit
    advises)."""
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            step()
        sync(device)
        rates.append(batches * views / (time.perf_counter() - start))
    return max(rates)


def with_boxes(module) -> bool:
    """Whether the method's PIL reference also gives the crop boxes (DenseCL's match accuracy)."""
    return module.__name__.startswith("densecl")


def views_per_s(module, flags, executor: str, count: int, device) -> float:
    """Views per second of loader + view making with the method's views, `count` views in
    three timed runs after one untimed batch (worker start): PIL views in the workers, or, as
    pretrain.py does, batches sliced from the array and BatchViews on `device`."""
    args = module.get_args(flags)
    views = module.pretrain_views(args)
    per_batch = args.batch_size * len(views)
    batches = -(-count // (3 * per_batch))
    ds = InMemory(args.batch_size * (3 * batches + 1), MultiView(views, with_boxes(module)))
    if executor == "device":  # common/loaders.py pretrain_loader: an array needs no workers
        loader = torch.utils.data.DataLoader(array_images(ds), args.batch_size,
                                             collate_fn=ArrayImages.collate)
    else:
        loader = torch.utils.data.DataLoader(ds, args.batch_size, num_workers=args.num_workers)
    make = BatchViews(views, device)
    batch_iter = iter(loader)

    def next_views():
        batch = next(batch_iter)
        return make(batch)[0] if executor == "device" else batch[0]

    next_views()
    return best_rate(next_views, batches, per_batch, device)


def views_in_memory_per_s(module, flags, count: int, device) -> float:
    """Views per second of BatchViews alone, on one batch already on `device`: the view making
    without the loader."""
    args = module.get_args(flags)
    views = module.pretrain_views(args)
    images, sizes, _ = array_images(InMemory(args.batch_size, None)).__getitems__(
        range(args.batch_size))
    images, make = images.to(device), BatchViews(views, device)
    labels = torch.zeros(len(images))
    per_batch = args.batch_size * len(views)
    make((images, sizes, labels))
    return best_rate(lambda: make((images, sizes, labels)), -(-count // (3 * per_batch)), per_batch,
                     device)


def describe_views(module, flags) -> str:
    """'B x V views' of the method's views under `flags`."""
    args = module.get_args(flags)
    return f"{args.batch_size} x {len(module.pretrain_views(args))}"


def run_flags(module, flags, steps: int, warmup: int, out: str) -> list:
    """pretrain.py flags of a one-epoch run of steps + warmup steps that neither logs nor
    evaluates."""
    batch = module.get_args(flags).batch_size
    return [*flags, "--max-epochs", "1", "--eval-every", "0", "--log-every", "1000",
            "--checkpoint-every", "0", "--dev", str((steps + warmup) * batch), "--output-dir", out]


def ours_images_per_s(module, flags, steps: int, warmup: int, device) -> float:
    """Images/s of the method's train_step inside a one-epoch pretrain.py run."""
    real, times = module.train_step, []

    def timed(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = real(*args, **kwargs)
        sync(device)
        times.append(time.perf_counter() - start)
        return out

    module.train_step = timed
    try:
        with tempfile.TemporaryDirectory() as out:
            module.main(run_flags(module, flags, steps, warmup, out))
    finally:
        module.train_step = real
    return steps * module.get_args(flags).batch_size / sum(times[warmup:])


def ours_profile(module, flags, device) -> dict:
    """profile_steps of a short real run (ops per step, syncs), and on a GPU the share of the
    steps' wall time with a kernel running and the run's peak GPU memory. DenseCL's split
    BatchNorm is counted in the form a GPU runs (one call; per chunk on the CPU)."""
    import densecl.model
    per_chunk = densecl.model.split_norm_per_chunk
    densecl.model.split_norm_per_chunk = densecl.model.split_norm_one_call
    try:
        with tempfile.TemporaryDirectory() as out:
            found = profile_steps(lambda: module.main(run_flags(module, flags, 6, 2, out)),
                                  module)
    finally:
        densecl.model.split_norm_per_chunk = per_chunk
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        try:  # first run on a GPU since written: a failure here must not lose the rest
            found["gpu_busy"] = gpu_busy(module, flags)
        except Exception as e:
            print(f"GPU busy share not measured: {type(e).__name__}: {e}")
            found["gpu_busy"] = float("nan")
        found["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return found


def gpu_busy(module, flags, steps: int = 6) -> float:
    """Share of the wall time of `steps` steady-state loop iterations (train_step start to
    train_step start) in which the GPU runs a kernel, from torch.profiler's CUDA trace."""
    from torch.profiler import ProfilerActivity, profile
    with tempfile.TemporaryDirectory() as out, marked_steps(module), \
            profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        module.main(run_flags(module, flags, steps + 1, 3, out))
    events = prof.events()
    starts = sorted(e.time_range.start for e in events if e.name == "train_step")[3:]
    begin, end = starts[0], starts[-1]
    kernels = [e.time_range for e in events if e.device_type.name == "CUDA"
               and begin <= e.time_range.start < end]
    busy, reach = 0.0, begin  # the union of the kernels' intervals
    for start, stop in sorted((k.start, k.end) for k in kernels):
        busy += max(0.0, min(stop, end) - max(start, reach))
        reach = max(reach, stop)
    return busy / (end - begin)


def have_lightly() -> bool:
    try:
        return importlib.import_module("lightly") is not None
    except ImportError:
        return False


def peer_images_per_s(method, flags, steps: int, warmup: int, device) -> float:
    """Images/s of lightly's example-style step on the same work."""
    args = importlib.import_module(f"{method}.pretrain").get_args(flags)
    step, inputs = PEERS[method](args, device)
    for _ in range(warmup):
        step(inputs)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(inputs)
    sync(device)
    return steps * args.batch_size / (time.perf_counter() - start)


def peer_ops(method, flags, device, steps: int = 3) -> float:
    """aten ops per step of lightly's example-style step (called from Python or autograd)."""
    from torch.profiler import ProfilerActivity, profile
    step, inputs = PEERS[method](importlib.import_module(f"{method}.pretrain").get_args(flags),
                                 device)
    step(inputs)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(inputs)
    return sum(e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name
                                                      .startswith("aten::"))
               for e in prof.events()) / steps


class Trunk(nn.Module):
    """Our ResNet trunk returning the C5 map (lightly's examples cut torchvision's at -2)."""

    def __init__(self, args):
        super().__init__()
        self.net = resnet(args.backbone, args.stem, args.image_size)

    def forward(self, x):
        return feature_map(self.net, x)


def _views(args, count, device, size=None):
    size = size or args.image_size
    return [torch.randn(args.batch_size, 3, size, size, device=device) for _ in range(count)]


def peer_mmcr(args, device):
    """lightly examples/pytorch/mmcr.py: k online and k momentum forwards, MMCRLoss."""
    from lightly.loss import MMCRLoss
    from lightly.models.modules.heads import MMCRProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    backbone = resnet(args.backbone, args.stem, args.image_size)
    head = MMCRProjectionHead(512, args.hidden_dim[0], args.projection_dim, num_layers=1)
    online = nn.Sequential(backbone, head).to(device)
    momentum = copy.deepcopy(online)
    deactivate_requires_grad(momentum)
    criterion, opt = MMCRLoss(lmda=args.lmbda), torch.optim.SGD(online.parameters(), lr=0.06)

    def step(views):
        update_momentum(online, momentum, args.ema)
        z_o = torch.stack([online(x) for x in views], 1)
        z_m = torch.stack([momentum(x).detach() for x in views], 1)
        loss = criterion(z_o, z_m)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step, _views(args, args.num_views, device)


def peer_nnclr(args, device):
    """lightly examples/pytorch/nnclr.py: two forwards, NNMemoryBankModule, NTXentLoss."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import (NNCLRPredictionHead, NNCLRProjectionHead,
                                        NNMemoryBankModule)
    backbone = resnet(args.backbone, args.stem, args.image_size).to(device)
    proj = NNCLRProjectionHead(512, args.hidden_dim, args.projection_dim).to(device)
    pred = NNCLRPredictionHead(args.projection_dim, args.pred_hidden_dim,
                               args.projection_dim).to(device)
    bank = NNMemoryBankModule(size=(args.queue_size, args.projection_dim)).to(device)
    params = [*backbone.parameters(), *proj.parameters(), *pred.parameters()]
    criterion, opt = NTXentLoss(), torch.optim.SGD(params, lr=0.06)

    def step(views):
        z0, z1 = (proj(backbone(x)) for x in views)
        p0, p1 = pred(z0), pred(z1)
        z0, z1 = bank(z0.detach(), update=False), bank(z1.detach(), update=True)
        loss = 0.5 * (criterion(z0, p1) + criterion(z1, p0))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step, _views(args, 2, device)


def peer_densecl(args, device):
    """lightly examples/pytorch/densecl.py: global and local heads, their momentum copies,
    select_most_similar, two NTXentLoss memory banks (keys from the momentum copies)."""
    from lightly.loss import NTXentLoss
    from lightly.models import utils
    from lightly.models.modules.heads import DenseCLProjectionHead
    trunk = Trunk(args).to(device)
    heads = nn.ModuleList([DenseCLProjectionHead(512, 512, 128) for _ in range(2)]).to(device)
    online = nn.ModuleList([trunk, heads])
    slow = copy.deepcopy(online)
    utils.deactivate_requires_grad(slow)
    banks = [NTXentLoss(0.2, memory_bank_size=(args.queue_size, 128)) for _ in range(2)]
    opt = torch.optim.SGD(online.parameters(), lr=0.06, momentum=0.9)

    def forward(net, x):
        f = net[0](x)  # (B, C, H, W)
        return f, net[1][0](f.mean((2, 3))), net[1][1](f.flatten(2).transpose(1, 2))

    def step(views):
        utils.update_momentum(online, slow, args.ema)
        q_f, q_g, q_l = forward(online, views[0])
        with torch.no_grad():
            k_f, k_g, k_l = forward(slow, views[1])
            k_l = utils.select_most_similar(q_f.flatten(2).transpose(1, 2),
                                            k_f.flatten(2).transpose(1, 2), k_l)
        loss = 0.5 * (banks[0](q_g, k_g) + banks[1](q_l.flatten(0, 1), k_l.flatten(0, 1)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step, _views(args, 2, device)


def peer_msn(args, device):
    """lightly examples/pytorch/msn.py: masked torchvision ViT, MSNProjectionHead, MSNLoss.
    The example masks the focal views too; here only the anchor view is masked, as in the
    official MSN and ours, so both steps push the same tokens through the same networks."""
    import torchvision
    from lightly.loss import MSNLoss
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerTorchvision
    from lightly.models.modules.heads import MSNProjectionHead

    from msn.model import vit_config
    vit = torchvision.models.VisionTransformer(**vit_config(args.arch, args.patch_size,
                                                            args.image_size, args.depth))
    target = nn.ModuleList([MaskedVisionTransformerTorchvision(vit=vit),
                            MSNProjectionHead(vit.hidden_dim, args.hidden_dim,
                                              args.projection_dim)]).to(device)
    anchor = copy.deepcopy(target)
    utils.deactivate_requires_grad(target)
    prototypes = nn.Linear(args.projection_dim, args.num_prototypes, bias=False).to(device)
    criterion = MSNLoss()
    opt = torch.optim.AdamW([*anchor.parameters(), *prototypes.parameters()], lr=1.5e-4)

    def masked(x):
        tokens = (x.shape[-1] // args.patch_size) ** 2
        keep, _ = utils.random_token_mask((x.shape[0], tokens), args.mask_ratio, device=device)
        return anchor[1](anchor[0](images=x, idx_keep=keep))

    def step(views):
        utils.update_momentum(anchor, target, 0.996)
        targets = target[1](target[0](images=views[0]))
        focal = anchor[1](anchor[0](images=torch.cat(views[2:])))
        anchors = torch.cat([masked(views[1]), focal])
        loss = criterion(anchors, targets, prototypes.weight.data)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step, _views(args, 2, device) + _views(args, args.focal_views, device,
                                                 args.focal_size)


PEERS = {"mmcr": peer_mmcr, "nnclr": peer_nnclr, "densecl": peer_densecl, "msn": peer_msn}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["mmcr", "nnclr", "densecl", "msn"],
                   choices=["mmcr", "nnclr", "densecl", "msn"])
    p.add_argument("--device", default="cpu", choices=["cuda", "cpu"])
    p.add_argument("--threads", type=int, default=2, help="torch threads of every measurement")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (views/s)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--views", type=int, default=20000,
                   help="views timed per pipeline, in three runs (the fastest counts)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    bench = p.parse_args()
    keep_freed_memory()  # as the scripts do: every measurement under the same allocator
    torch.set_num_threads(bench.threads)
    device = torch.device(bench.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{where}, {bench.threads} torch threads, {bench.num_workers} workers, "
          f"{bench.precision}, torch {torch.__version__}")
    for method in bench.methods:
        module = importlib.import_module(f"{method}.pretrain")
        common = ["--dataset", "synthetic", "--device", bench.device, "--precision",
                  bench.precision, "--threads", str(bench.threads), "--num-workers",
                  str(bench.num_workers)]
        flags = [*common, *WORK[method]]
        works = [(" ".join(WORK[method]), flags)]
        if device.type == "cuda":  # the recipe's default batch (MMCR: 64 x 16 views)
            works.append(("default batch", common))
        for batch, batch_flags in (("step's batch", flags), ("default batch", common)):
            rates = {e: views_per_s(module, batch_flags, e, bench.views, device)
                     for e in ("pil", "device")}
            alone = views_in_memory_per_s(module, batch_flags, bench.views, device)
            print(f"{method:8s} views/s  device {rates['device']:8.0f}  pil "
                  f"{rates['pil']:8.0f}  ratio {rates['device'] / rates['pil']:5.2f}   "
                  f"without the loader {alone:8.0f}   "
                  f"({batch}: {describe_views(module, batch_flags)})")
        for work, work_flags in works:
            ours = ours_images_per_s(module, [*work_flags, "--num-workers", "0"], bench.steps,
                                     bench.warmup, device)
            versus = "lightly not installed"
            if have_lightly():
                peer = peer_images_per_s(method, work_flags, bench.steps, bench.warmup, device)
                versus = f"peer {peer:7.1f}  ratio {ours / peer:5.2f}"
            print(f"{method:8s} step images/s  ours {ours:7.1f}  {versus}   ({work})")
        found = ours_profile(module, [*flags, "--num-workers", "0"], device)
        peer = f"  peer's step {peer_ops(method, flags, device):6.0f}" if have_lightly() else ""
        gpu = f"   GPU busy {found['gpu_busy']:.0%} of the step, peak {found['peak_gb']:.1f} " \
            "GB" if "gpu_busy" in found else ""
        print(f"{method:8s} aten ops per step  ours {found['step_ops']:6.0f} (loop with views "
              f"{found['loop_ops']:6.0f}){peer}   syncs {found['syncs'] or 'none'}{gpu}")


if __name__ == "__main__":
    main()
