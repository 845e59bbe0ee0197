"""Linear probe / finetune of an MSN backbone: the target (EMA) ViT. Features: the class token
after the final LayerNorm (the pretraining representation), or with --features last-block the
official linear evaluation's (the last block's class token before the final norm, into
LayerNorm, L2 normalisation and a Linear layer; msn linear_eval.py).

    python msn/finetune.py --checkpoint runs/msn/<run>/last.pt                  # linear probe
    python msn/finetune.py --checkpoint runs/msn/<run>/best.pt --finetune-type backbone+linear
    torchrun --nproc_per_node 8 msn/finetune.py --checkpoint runs/msn/<run>/last.pt
"""
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

import torch.nn as nn
import torch.nn.functional as F

from common.errors import run_main
from common.finetune import finetune_args, load_pretrained, run_finetune
from common.flags import parse_command_line
from msn.model import ViT


class OfficialHead(nn.Module):
    """LayerNorm -> L2 normalisation -> Linear with N(0, 0.01) weights and zero bias, the
    classifier of the official linear evaluation (msn linear_eval.py)."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(F.normalize(self.norm(x), dim=1))


def build_backbone(pretrain_args):
    """The (untrained) ViT of a pretraining run (its resolved flags), and its width."""
    return ViT(**pretrain_args.vit_config), pretrain_args.vit_config["hidden_dim"]


def get_args(argv=None):
    p = finetune_args("Linear probe / finetune of an MSN backbone")
    p.add_argument_group("msn").add_argument(
        "--features", default="final-norm", choices=["final-norm", "last-block"],
        help="final-norm: class token after the final LayerNorm, into a Linear layer; "
        "last-block: the official linear evaluation's features and head (module docstring)")
    return parse_command_line(p, argv)


def main(argv=None):
    args = get_args(argv)
    backbone, width, pretrain_args = load_pretrained(args.checkpoint, "msn", build_backbone,
                                                     "target_encoder.")
    head = None
    if args.features == "last-block":
        backbone.encoder.ln = nn.Identity()  # the last block's class token, no final norm
        head = partial(OfficialHead, width)  # called with the class count
    return run_finetune(args, backbone, width, pretrain_args, head)


if __name__ == "__main__":
    run_main(main)
