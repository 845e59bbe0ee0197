"""Linear probe / finetune of an NNCLR backbone.

    python nnclr/finetune.py --checkpoint runs/nnclr/<run>/last.pt                 # linear probe
    python nnclr/finetune.py --checkpoint runs/nnclr/<run>/best.pt --finetune-type backbone+linear
    torchrun --nproc_per_node 8 nnclr/finetune.py --checkpoint runs/nnclr/<run>/last.pt
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from common.backbone import resnet_of
from common.errors import run_main
from common.finetune import finetune_args, load_pretrained, run_finetune
from common.flags import parse_command_line


def get_args(argv=None):
    return parse_command_line(finetune_args("Linear probe / finetune of an NNCLR backbone"), argv)


def main(argv=None):
    args = get_args(argv)
    backbone, width, pretrain_args = load_pretrained(args.checkpoint, "nnclr", resnet_of,
                                                     "backbone.")
    return run_finetune(args, backbone, width, pretrain_args)


if __name__ == "__main__":
    run_main(main)
