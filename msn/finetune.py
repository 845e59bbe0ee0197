"""Linear probe / finetune of an MSN backbone: the target (EMA) ViT, class token after the final
LayerNorm (the pretraining representation; the official linear eval differs, see README).

    python msn/finetune.py --checkpoint runs/msn/<run>/last.pt                  # linear probe
    python msn/finetune.py --checkpoint runs/msn/<run>/best.pt --finetune-type backbone+linear
    torchrun --nproc_per_node 8 msn/finetune.py --checkpoint runs/msn/<run>/last.pt
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from common.finetune import finetune_args, load_backbone, pretrain_state, run_finetune
from common.train import run_main
from msn.model import ViT


def main(argv=None):
    args = finetune_args("Linear probe / finetune of an MSN backbone").parse_args(argv)
    state, pre = pretrain_state(args.checkpoint, "msn")
    backbone = ViT(**pre["vit_config"])
    load_backbone(backbone, state, "target_encoder.")
    return run_finetune(args, backbone, pre["vit_config"]["hidden_dim"], pre)


if __name__ == "__main__":
    run_main(main)
