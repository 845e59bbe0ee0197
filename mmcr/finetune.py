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
from common.flags import parse_command_line
from mmcr.pretrain import pretrain_views


def get_args(argv=None):
    p = finetune_args("Linear probe / finetune of an MMCR backbone")
    p.add_argument_group("mmcr").add_argument(
        "--train-views", default="crop-flip", choices=["crop-flip", "pretrain"],
        help="the training images' views. crop-flip: random resized crop and flip; pretrain: "
        "one view of the pretraining recipe, as the official CIFAR/STL probe "
        "(mmcr/cifar_stl/train_linear_classifier.py) and the playground's probe")
    return parse_command_line(p, argv)


def main(argv=None):
    args = get_args(argv)
    backbone, width, pretrain_args = load_pretrained(args.checkpoint, "mmcr", resnet_of,
                                                     "backbone.")
    view = None
    if args.train_views == "pretrain":
        view = lambda data: pretrain_views(data)[0]  # noqa: E731
    return run_finetune(args, backbone, width, pretrain_args, train_view=view)


if __name__ == "__main__":
    run_main(main)
