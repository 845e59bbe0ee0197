"""Linear probe / finetune of a DenseCL backbone (the online network, not the momentum copy).

    python densecl/finetune.py --checkpoint runs/densecl/<run>/last.pt               # linear probe
    python densecl/finetune.py --checkpoint runs/densecl/<run>/best.pt \\
        --finetune-type backbone+linear
    torchrun --nproc_per_node 8 densecl/finetune.py --checkpoint runs/densecl/<run>/last.pt
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from common.backbone import FEATURE_DIM, resnet
from common.finetune import finetune_args, load_backbone, pretrain_state, run_finetune
from common.train import run_main
from densecl.model import official_init


def build_backbone(pre: dict):
    """The (untrained, officially initialised) backbone of a pretraining run with args `pre`,
    and its feature width; plain BatchNorm2d."""
    net = official_init(resnet(pre["backbone"], pre["stem"], pre["image_size"]))
    return net, FEATURE_DIM[pre["backbone"]]


def main(argv=None):
    args = finetune_args("Linear probe / finetune of a DenseCL backbone").parse_args(argv)
    state, pre = pretrain_state(args.checkpoint, "densecl")
    backbone, width = build_backbone(pre)
    load_backbone(backbone, state, "backbone.")  # 'momentum_backbone.*' is not selected
    return run_finetune(args, backbone, width, pre)


if __name__ == "__main__":
    run_main(main)
