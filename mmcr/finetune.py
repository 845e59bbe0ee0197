"""Linear probe / finetune of an MMCR backbone.

    python mmcr/finetune.py --checkpoint runs/mmcr/<run>/last.pt                 # linear probe
    python mmcr/finetune.py --checkpoint runs/mmcr/<run>/best.pt --finetune-type backbone+linear
    torchrun --nproc_per_node 8 mmcr/finetune.py --checkpoint runs/mmcr/<run>/last.pt
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from common.backbone import resnet_of
from common.errors import run_main
from common.finetune import finetune_args, load_pretrained, run_finetune


def main(argv=None):
    args = finetune_args("Linear probe / finetune of an MMCR backbone").parse_args(argv)
    backbone, width, pre = load_pretrained(args.checkpoint, "mmcr", resnet_of, "backbone.")
    return run_finetune(args, backbone, width, pre)


if __name__ == "__main__":
    run_main(main)
