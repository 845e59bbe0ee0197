"""Linear probe / finetune of an NNCLR backbone.

    python nnclr/finetune.py --checkpoint runs/nnclr/<run>/last.pt                 # linear probe
    python nnclr/finetune.py --checkpoint runs/nnclr/<run>/best.pt --finetune-type backbone+linear
    torchrun --nproc_per_node 8 nnclr/finetune.py --checkpoint runs/nnclr/<run>/last.pt
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from common.backbone import FEATURE_DIM, resnet
from common.errors import run_main
from common.finetune import finetune_args, load_pretrained, run_finetune


def build_backbone(pre: dict):
    """The untrained ResNet trunk of a pretraining run with args `pre`, and its width."""
    return resnet(pre["backbone"], pre["stem"], pre["image_size"]), FEATURE_DIM[pre["backbone"]]


def main(argv=None):
    args = finetune_args("Linear probe / finetune of an NNCLR backbone").parse_args(argv)
    backbone, width, pre = load_pretrained(args.checkpoint, "nnclr", build_backbone,
                                           "backbone.")
    return run_finetune(args, backbone, width, pre)


if __name__ == "__main__":
    run_main(main)
