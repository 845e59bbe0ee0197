"""Linear probe / finetune of an MMCR backbone.

    python mmcr/finetune.py --checkpoint runs/mmcr/<run>/last.pt                 # linear probe
    python mmcr/finetune.py --checkpoint runs/mmcr/<run>/best.pt --finetune-type backbone+linear
    torchrun --nproc_per_node 8 mmcr/finetune.py --checkpoint runs/mmcr/<run>/last.pt
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from common.backbone import FEATURE_DIM, resnet
from common.finetune import finetune_args, load_backbone, pretrain_state, run_finetune
from common.train import run_main


def build_backbone(pre: dict):
    """The (untrained) backbone of a pretraining run with args `pre`, and its feature width."""
    return resnet(pre["backbone"], pre["stem"], pre["image_size"]), FEATURE_DIM[pre["backbone"]]


def main(argv=None):
    args = finetune_args("Linear probe / finetune of an MMCR backbone").parse_args(argv)
    state, pre = pretrain_state(args.checkpoint, "mmcr")
    backbone, width = build_backbone(pre)
    load_backbone(backbone, state, "backbone.")
    return run_finetune(args, backbone, width, pre)


if __name__ == "__main__":
    run_main(main)
