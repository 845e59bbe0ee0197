"""Linear probe / finetune of a DenseCL backbone (the online network, not the momentum copy).

    python densecl/finetune.py --checkpoint runs/densecl/<run>/last.pt             # linear probe
    python densecl/finetune.py --checkpoint runs/densecl/<run>/best.pt \\
        --finetune-type backbone+linear
    torchrun --nproc_per_node 8 densecl/finetune.py --checkpoint runs/densecl/<run>/last.pt
"""
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

import torch.nn as nn

from common.backbone import resnet_of
from common.errors import run_main
from common.finetune import finetune_args, load_pretrained, run_finetune
from common.flags import parse_command_line


def classifier(width: int, classes: int) -> nn.Linear:
    """The linear classifier of the official benchmark: N(0, 0.01) weights, zero bias
    (openselfsup/models/heads/cls_head.py)."""
    fc = nn.Linear(width, classes)
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    return fc


def get_args(argv=None):
    return parse_command_line(finetune_args("Linear probe / finetune of a DenseCL backbone"), argv)


def main(argv=None):
    args = get_args(argv)
    backbone, width, pretrain_args = load_pretrained(args.checkpoint, "densecl", resnet_of,
                                                     "backbone.")
    return run_finetune(args, backbone, width, pretrain_args, head=partial(classifier, width))


if __name__ == "__main__":
    run_main(main)
