"""torchvision ResNets with the CIFAR stem for small images (MMCR playground, solo-learn)."""
import argparse

import torch.nn as nn
import torchvision

from common.errors import UserError
from common.flags import by_recipe

FEATURE_DIM = {"resnet18": 512, "resnet50": 2048}


def add_resnet_args(parser, recipes: dict) -> None:
    """--backbone (a recipe flag), --stem and --channels-last, shared by the ResNet methods."""
    parser.add_argument("--backbone", choices=sorted(FEATURE_DIM), default=argparse.SUPPRESS,
                        help="torchvision ResNet trunk (fc removed) "
                        f"{by_recipe(recipes, 'backbone')}")
    parser.add_argument("--stem", default="auto", choices=["auto", "cifar", "imagenet"],
                        help="cifar: 3x3 stride-1 conv, no maxpool (stride 8); imagenet: 7x7 "
                             "stride-2 conv + maxpool (stride 32); auto: the recipe's (imagenet "
                             "for the imagenet recipe, else cifar)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last memory format of the CNN; unset: on, except with "
                        "fp32 on CUDA (faster convolutions: on 2 CPU cores 1.1-1.2x a ResNet-18 "
                        "step)")


def resolve_stem(stem: str, recipe: str) -> str:
    """--stem auto: the ImageNet stem for the imagenet recipe, the CIFAR stem for cifar and
    stl10 (the official MMCR code runs STL-10 at 64 px without max-pool too)."""
    return stem if stem != "auto" else ("imagenet" if recipe == "imagenet" else "cifar")


def resnet(arch: str, stem: str, image_size: int, zero_init_residual: bool = False):
    """ResNet trunk mapping (B, 3, H, W) to (B, FEATURE_DIM[arch]) pooled features. Its
    state_dict loads into torchvision.models.<arch>() (same stem) with only fc missing.
    `stem` is resolved (cifar or imagenet)."""
    smallest = 8 if stem == "cifar" else 32
    if image_size < smallest:
        raise UserError(f"--image-size {image_size} is too small for the {stem} stem "
                        f"(at least {smallest} px)")
    net = getattr(torchvision.models, arch)(zero_init_residual=zero_init_residual)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def resnet_of(pretrain_args):
    """The untrained ResNet trunk of a pretraining run (its resolved flags: backbone, stem,
    image size), and its feature width: what a finetune.py loads the checkpoint into."""
    a = pretrain_args
    return resnet(a.backbone, a.stem, a.image_size), FEATURE_DIM[a.backbone]
