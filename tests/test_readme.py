"""Every pretrain.py / finetune.py command that README.md shows parses with the flags it uses."""
import importlib
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import resolved

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands():
    """(script, argv) of each command line in README's bash blocks (after torchrun or &&)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():  # joins continued lines
        for command in line.split("&&"):
            words = shlex.split(command.replace("<", "").replace(">", ""), comments=True)
            words = words[:-1] if words[-1:] == ["&"] else words  # run in the background
            scripts = [i for i, w in enumerate(words)
                       if re.fullmatch(r"(mmcr|nnclr|densecl|msn)/(pretrain|finetune)\.py", w)]
            if scripts:
                yield words[scripts[0]], words[scripts[0] + 1:]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """An ImageNet-size image folder (one 256 px image in train/a and val/a)."""
    root = tmp_path_factory.mktemp("photos")
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        Image.new("RGB", (256, 256)).save(root / split / "a" / "0.png")
    return root


@pytest.mark.parametrize("script, argv", list(readme_commands()))
def test_readme_command_parses(script, argv, photo_folder):
    module = importlib.import_module(script[:-3].replace("/", "."))
    if "--data-dir" in argv and not Path(argv[argv.index("--data-dir") + 1]).exists():
        argv = [*argv, "--data-dir", str(photo_folder)]  # a placeholder such as /data/imagenet
    module.get_args(argv)


def real_image_commands():
    """(method, pretrain.py flags) of each `python tests/real_images.py` line in README."""
    for line in re.findall(r"^python tests/real_images.py .*$", README.read_text(), flags=re.M):
        words = shlex.split(line)
        yield words[words.index("--method") + 1], words[words.index("--") + 1:]


def test_readme_shows_a_real_image_command_per_method():
    assert sorted(m for m, _ in real_image_commands()) == ["densecl", "mmcr", "msn", "nnclr"]


@pytest.mark.parametrize("method, flags", list(real_image_commands()))
def test_readme_real_image_command_parses_and_builds_its_backbone(method, flags, tmp_path):
    # as tests/real_images.py runs it: the flags on a 32 px image folder, then the untrained
    # backbone built from the run's args
    import real_images
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / split / "a" / "0.png")
    args = importlib.import_module(f"{method}.pretrain").get_args(
        ["--dataset", "imagefolder", "--data-dir", str(tmp_path), *flags])
    net, width = real_images.backbone_builder(method)(args)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, width)


def test_readme_shows_every_method():
    scripts = {script for script, _ in readme_commands()}
    assert {f"{m}/{s}.py" for m in ("mmcr", "nnclr", "densecl", "msn")
            for s in ("pretrain", "finetune")} <= scripts


def readme_line(comment: str):
    """(processes, script, argv) of the README command whose comment starts with `comment`."""
    for line in re.findall(r"^(?:torchrun|python) .*$", README.read_text(), flags=re.M):
        command, _, said = line.partition("  # ")
        if said.strip().startswith(comment):
            words = shlex.split(command.replace("<", "").replace(">", ""))
            script = next(i for i, w in enumerate(words) if w.endswith(".py"))
            launch = dict(zip(words[1:script:2], words[2:script:2]))
            world = int(launch.get("--nnodes", 1)) * int(launch.get("--nproc_per_node", 1))
            return world, words[script], words[script + 1:]
    raise AssertionError(f"README shows no command commented '{comment}'")


# Each reference's linear-evaluation protocol, typed in from its source: (method, README
# comment, global batch, resolved flags).
OFFICIAL_EVALUATIONS = [
    # ThomasYerxa/mmcr fafd3a9 mmcr/cifar_stl/model_select.py + train_linear_classifier.py:
    # Adam lr 0.1 wd 1e-6, batch 1024, 50 epochs, cosine without warmup, net.train() (BN in
    # train mode), the training set with the SSL transform (train_transform=True)
    ("mmcr", "the official CIFAR/STL probe", 1024,
     dict(optimizer="adam", learning_rate=0.1, weight_decay=1e-6, max_epochs=50,
          schedule="cosine", warmup_duration=0, linear_bn="train", train_views="pretrain",
          finetune_type="linear", precision="fp32")),
    # linear_classifier_imagenet.py + mmcr/imagenet/train_linear_classifier.py: SGD momentum
    # 0.9, lr 0.3, wd 1e-6, batch 2048, 100 epochs, cosine, bicubic crops, BN in train mode,
    # no autocast
    ("mmcr", "the official ImageNet probe", 2048,
     dict(optimizer="sgd", learning_rate=0.3, weight_decay=1e-6, max_epochs=100,
          schedule="cosine", warmup_duration=0, linear_bn="train", crop_interpolation="bicubic",
          train_views="crop-flip", precision="fp32")),
    # bartoszzuk/mmcr 5eb4c13: Adam 1e-2, wd 1e-6, 50 epochs, 10% warmup, batch 1024 (README),
    # SSL views, BN in train mode, Lightning's default precision (32)
    ("mmcr", "the playground's probe", 1024,
     dict(optimizer="adam", learning_rate=1e-2, weight_decay=1e-6, max_epochs=50,
          warmup_duration=0.1, linear_bn="train", train_views="pretrain", precision="fp32")),
    # facebookresearch/msn 4388dc1 linear_eval.py, lineval_msn_vits16.yaml, README (4 nodes x 8
    # tasks): Nesterov SGD lr 6.4 (not scaled), wd 0, 256 per GPU, 100 epochs, cosine, no
    # warmup, last block's class token, bilinear crops, autocast with a gradient scaler (fp16)
    ("msn", "the official linear evaluation", 8192,
     dict(features="last-block", optimizer="nesterov", learning_rate=6.4, weight_decay=0,
          max_epochs=100, schedule="cosine", warmup_duration=0, crop_interpolation="bilinear",
          linear_bn="frozen", precision="fp16")),
    ("msn", "the same on one GPU", 256,
     dict(features="last-block", optimizer="nesterov", learning_rate=6.4 * 256 / 8192,
          weight_decay=0, max_epochs=100, warmup_duration=0, precision="fp16")),
    # vturrisi/solo-learn 9187ea3 scripts/linear/imagenet-100/nnclr.yaml: SGD lr 0.3, wd 0,
    # batch 256, 100 epochs, x 0.1 at 60 and 80, frozen BN, precision 16; its DALI loader crops
    # bicubically (solo/data/dali_dataloader.py, INTERP_CUBIC)
    ("nnclr", "solo-learn's linear evaluation", 256,
     dict(optimizer="sgd", learning_rate=0.3, weight_decay=0, max_epochs=100, schedule="step",
          lr_steps=[60, 80], linear_bn="frozen", crop_interpolation="bicubic",
          precision="fp16")),
    # WXinlong/DenseCL b64bbb6 configs/benchmarks/linear_classification/imagenet/r50_last.py:
    # SGD lr 30, momentum 0.9, wd 0, batch 256, 100 epochs, steps at 60 and 80, frozen BN, fp32
    ("densecl", "the official linear benchmark", 256,
     dict(optimizer="sgd", learning_rate=30, weight_decay=0, max_epochs=100, schedule="step",
          lr_steps=[60, 80], linear_bn="frozen", crop_interpolation="bilinear",
          precision="fp32")),
]


@pytest.mark.parametrize("method, comment, global_batch, expected", OFFICIAL_EVALUATIONS,
                         ids=[c for _, c, _, _ in OFFICIAL_EVALUATIONS])
def test_official_evaluation_commands_resolve_to_the_reference_protocol(method, comment,
                                                                         global_batch, expected):
    world, script, argv = readme_line(comment)
    assert script == f"{method}/finetune.py"
    args = importlib.import_module(f"{method}.finetune").get_args(argv)
    assert args.batch_size * world == global_batch
    assert resolved(args, expected), {k: getattr(args, k) for k in expected}


# Each reference's pretraining run, typed in from its source: (method, README comment, global
# batch, resolved flags); the learning rate is the peak after any batch scaling.
OFFICIAL_RUNS = [
    # ThomasYerxa/mmcr fafd3a9 pretrain_cifar_stl.py, mmcr/cifar_stl/train.py + models.py:
    # ResNet-50 with the CIFAR stem, 32 images x 40 views, Adam 1e-3 constant (no scheduler),
    # wd 1e-6, 500 epochs, fp32, projector 512-128, no momentum branch
    ("mmcr", "the official CIFAR-10 run", 32,
     dict(backbone="resnet50", stem="cifar", num_views=40, optimizer="adam", learning_rate=1e-3,
          warmup_duration=0, final_lr_ratio=1, weight_decay=1e-6, max_epochs=500,
          precision="fp32", hidden_dim=[512], projection_dim=128, ema=None)),
    # pretrain_imagenet.py at fafd3a9: batch 2048 on 4 nodes x 4 GPUs, n_aug 2, lr 0.6 x 2048 /
    # 256; at 287db45: n_aug 8, lr 0.8; mmcr/imagenet/train.py: Composer's precision "amp"
    # (fp16 with loss scaling); loss_mmcr_momentum.py: the other ranks' embeddings gathered
    # without gradient
    ("mmcr", "the official ImageNet run", 2048,
     dict(backbone="resnet50", stem="imagenet", num_views=2, optimizer="lars",
          learning_rate=0.6 * 2048 / 256, ema=0.99, max_epochs=100, precision="fp16",
          local_gradient=True)),
    ("mmcr", "the 8-view ImageNet run", 2048,
     dict(num_views=8, learning_rate=0.8 * 2048 / 256, precision="fp16")),
    # vturrisi/solo-learn 9187ea3 scripts/pretrain/imagenet-100/nnclr.yaml: 2 GPUs x 64, LARS
    # lr 0.4 x 128 / 256, temperature 0.2, queue 65,536, 400 epochs, precision 16
    ("nnclr", "solo-learn's ImageNet-100 run", 128,
     dict(backbone="resnet18", learning_rate=0.4 * 128 / 256, tau=0.2, queue_size=65536,
          max_epochs=400, precision="fp16")),
    # WXinlong/DenseCL b64bbb6 densecl_imagenet_200ep.py: 8 GPUs x 32, lr 0.03, EMA 0.999, no
    # fp16 config (fp32)
    ("densecl", "the official ImageNet recipe", 256,
     dict(backbone="resnet50", learning_rate=0.03, ema=0.999, queue_size=65536, max_epochs=200,
          precision="fp32")),
    # facebookresearch/msn 4388dc1 msn_vits16.yaml: 64 per GPU on 16 GPUs, lr 1e-3 (no rule),
    # use_fp16: false
    ("msn", "the official ViT-S/16 run", 1024,
     dict(arch="vit_small", patch_size=16, learning_rate=1e-3, max_epochs=800,
          precision="fp32")),
]


@pytest.mark.parametrize("method, comment, global_batch, expected", OFFICIAL_RUNS,
                         ids=[c for _, c, _, _ in OFFICIAL_RUNS])
def test_official_pretraining_commands_resolve_to_the_reference_run(method, comment, global_batch,
                                                                   expected, photo_folder,
                                                                   monkeypatch):
    world, script, argv = readme_line(comment)
    assert script == f"{method}/pretrain.py"
    if "--data-dir" in argv:  # the placeholder /data/imagenet
        argv = [*argv, "--data-dir", str(photo_folder)]
    monkeypatch.setenv("RANK", "0")  # as torchrun launches each process
    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = importlib.import_module(f"{method}.pretrain").get_args(argv)
    assert args.batch_size * world == global_batch
    assert resolved(args, expected), {k: getattr(args, k) for k in expected}
