"""Flags: the parser (defaults in --help, one-line errors, renamed flags), the argument types,
the flags every pretrain.py shares, and recipes.

A script's flags are resolved once, in its get_args(), in one order: the command line, then the
recipe (a method's defaults for one family of data), then what depends on the data and the
machine. After get_args() nothing changes `args`; it is what args.json and every checkpoint
hold, and what finetune.py reads back.
"""
import argparse
import sys

from common.checkpoint import RENAMED, load_checkpoint, resolve_output_dir, resume_path
from common.data import DATASETS, FAMILIES, data_family, resolve_data
from common.dist import print0
from common.runtime import cpu_cores


# what a resumed run takes from this command line rather than from its checkpoint: this machine's
# settings and where the run goes
OF_THIS_COMMAND = {"device", "threads", "num_workers", "compile", "resume", "output_dir",
                   "explicit"}


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and one-line errors (exit code 2). `renamed` maps old
    flag names to new ones: a flag typed the old way is one line naming the new one."""

    def __init__(self, renamed: dict | None = None, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)
        self.renamed = renamed or {}

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        for word in argv:
            if word.split("=")[0] in self.renamed:
                old = word.split("=")[0]
                self.error(f"{old} was renamed: use {self.renamed[old]}")
        return super().parse_args(argv, namespace)


def at_least(minimum: int, kind=int):
    """argparse type: a number >= minimum, else a one-line error naming the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} (got {text})")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def share(text: str) -> float:
    """argparse type: a float in (0, 1)."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1 (got {text})")
    return value


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = at_least(0, float)(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be positive (got 0)")
    return value


class Epochs(float):
    """A recipe value in epochs for a flag that takes a fraction of the run (--warmup-duration):
    Epochs(10) becomes 10 / --max-epochs, so a shorter run keeps the recipe's 10 epochs."""

    def __repr__(self):
        return f"{float(self):g} epochs"


class FromRecipe:
    """The default of a flag that a recipe sets: --help shows each recipe's value, and
    apply_recipe() puts the chosen recipe's value where the command line left the flag unset."""

    def __init__(self, recipes: dict, key: str):
        values = ["unset" if v is None else repr(v) if isinstance(v, Epochs) else str(v)
                  for v in (recipes[f][key] for f in FAMILIES)]
        self.text = values[0] if len(set(values)) == 1 else ", ".join(
            f"{f} {v}" for f, v in zip(FAMILIES, values))

    def __str__(self):
        return self.text


def add_common_args(parser, recipes: dict, *, knn_temperature: float = 0.5) -> None:
    """The flags every pretrain.py shares (MMCR playground spellings); those a recipe sets
    (batch size, epochs, learning rates, warmup, weight decay) take their defaults from
    `recipes`."""
    a = parser.add_argument
    a("--dataset", default="cifar10", choices=DATASETS,
      help="synthetic is generated in-process and needs no files (offline smoke runs)")
    a("--data-dir", default="data", help="where datasets live (CIFAR/STL download here); "
      "for imagefolder: a root with train/ and val/ class folders, or a flat image folder")
    a("--recipe", default="auto", choices=["auto", *FAMILIES], help="the method's defaults for "
      "this kind of data (views, normalisation, stem, hyper-parameters); auto: cifar for "
      "CIFAR/synthetic, stl10 for STL-10, and for an image folder by the image size (up to 48 "
      "px cifar, up to 128 px stl10, else imagenet). Flags given explicitly always win")
    a("--image-size", type=at_least(1), default=None, help="crop size; unset: the dataset's "
      "(32 CIFAR/synthetic, 64 STL-10), for an image folder the recipe's (32/64/224)")
    a("--mean", type=float, nargs=3, default=None, help="normalisation mean (RGB); unset: the "
      "dataset's, for an image folder the recipe's (CIFAR-10 / STL-10 / ImageNet constants)")
    a("--std", type=float, nargs=3, default=None, help="normalisation std (RGB); unset: as "
      "--mean")
    a("--holdout", type=share, default=0.2, help="for an image folder of one subfolder per "
      "class (no train/ and val/): the share of each class held out, with a fixed seed, as the "
      "test split of the kNN monitor and the probe")
    a("--batch-size", type=at_least(1), default=FromRecipe(recipes, "batch_size"),
      help="images per process per step (the global batch is this x world size)")
    a("--max-epochs", type=at_least(1), default=FromRecipe(recipes, "max_epochs"),
      help="pretraining epochs")
    a("--learning-rate", type=positive_float, default=FromRecipe(recipes, "learning_rate"),
      help="peak learning rate, as used (printed at start)")
    if "base_learning_rate" in recipes["cifar"]:
        a("--base-learning-rate", type=positive_float,
          default=FromRecipe(recipes, "base_learning_rate"), help="peak learning rate per 256 "
          "images of global batch: used when --learning-rate is unset, as base x global "
          "batch / 256")
    a("--warmup-duration", type=at_least(0, float),
      default=FromRecipe(recipes, "warmup_duration"),
      help="linear warmup as a fraction of all steps, then cosine decay")
    a("--weight-decay", type=at_least(0, float), default=FromRecipe(recipes, "weight_decay"),
      help="weight decay")
    a("--num-neighbours", type=at_least(1), default=200, help="k of the kNN monitor")
    a("--temperature", type=positive_float, default=knn_temperature, help="kNN vote "
      "temperature T (weights exp(cos/T)); not a loss temperature")
    a("--eval-every", type=at_least(0), default=1, help="kNN every N epochs (0: never)")
    a("--augment", default="device", choices=["device", "pil"], help="device: the loader only "
      "decodes, the views of a whole batch are made on the training device with tensor ops; "
      "pil: each view made by PIL in the DataLoader workers (the reference)")
    a("--dev", type=at_least(0), nargs="?", const=2048, default=0, help="use only the first N "
      "images of each split for a quick look (N = 2048 when given without a value; 0: all)")
    a("--output-dir", default=None, help="run directory; unset: runs/<method>/<dataset>-<time>")
    a("--resume", default=None, help="checkpoint path, or 'auto' for last.pt of --output-dir "
      "(or of the newest run of this method)")
    a("--save-every", type=at_least(0), default=0, help="also keep epochNNNN.pt every N epochs "
      "(0: off)")
    a("--checkpoint-every", type=at_least(0, float), default=30, help="also write last.pt every "
      "N minutes of training, part-way through an epoch (0: at epoch ends only)")
    a("--log-every", type=at_least(1), default=50, help="steps between TensorBoard/progress "
      "updates")
    a("--seed", type=int, default=42, help="random seed (each process uses seed + rank)")
    a("--compile", action="store_true", help="torch.compile the training forward")
    add_machine_args(parser)


def add_machine_args(parser) -> None:
    """--precision, --threads, --device, --num-workers, --dist-timeout: how this machine runs
    the job (pretrain.py and finetune.py alike)."""
    a = parser.add_argument
    a("--num-workers", type=at_least(0), default=min(8, cpu_cores()),
      help="DataLoader workers per process (the cores this process may use, at most 8)")
    a("--dist-timeout", type=positive_float, default=10, help="minutes a collective waits for "
      "a missing rank before the run fails (torchrun)")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="autocast dtype for the networks (losses always run in float32); auto: bf16 on a "
      "CUDA GPU that supports it, else fp32 (on a CPU with AVX512-BF16 or AMX, bf16 runs "
      "about 2.5x faster: pass it explicitly)")
    a("--threads", type=at_least(1), default=None, help="torch intra-op threads per process; "
      "unset: this process's share of the cores, less one per PIL worker (printed at "
      "start)")
    a("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if present")


def parse(parser, argv, method: str):
    """The command line, resolved where a run goes: --output-dir (for --resume auto the newest
    run of `method`), --resume (the checkpoint to continue, or None), args.explicit (the flags
    the command line gave). A resumed run takes every flag the command line leaves unset from
    its checkpoint, except those of this machine, so `--output-dir RUN --resume auto` alone
    continues RUN as it was started; a flag that contradicts the checkpoint is refused later,
    naming both values."""
    args = parser.parse_args(argv)
    unset = object()  # what the command line gave: parsed again with every default unset
    parser.set_defaults(**{k: unset for k in vars(args)})
    args.explicit = sorted(k for k, v in vars(parser.parse_args(argv)).items() if v is not unset)
    args.output_dir = str(resolve_output_dir(args, method))
    resume = resume_path(args)
    args.resume = str(resume) if resume else None
    if resume:
        saved = load_checkpoint(resume, method)["args"]
        for key, value in saved.items():
            key = RENAMED.get(key, key)
            if key in vars(args) and key not in args.explicit and key not in OF_THIS_COMMAND:
                setattr(args, key, value)
    return args


def apply_recipe(args, recipes: dict) -> None:
    """Resolve --recipe auto, put the recipe's value in every flag left unset, then the data's
    image size and normalisation."""
    if args.recipe == "auto":
        args.recipe = data_family(args.dataset, args.data_dir, args.image_size)
    recipe = recipes[args.recipe]
    for key in recipe:
        if isinstance(getattr(args, key), FromRecipe):
            setattr(args, key, recipe[key])
    for key in recipe:
        if isinstance(getattr(args, key), Epochs):
            setattr(args, key, share_of_run(key, getattr(args, key), args.max_epochs))
    unset = [k for k, v in vars(args).items() if isinstance(v, FromRecipe)]
    assert not unset, f"flags with a recipe default that no recipe sets: {unset}"
    resolve_data(args)


def share_of_run(key: str, epochs: Epochs, max_epochs: int) -> float:
    """A recipe's value in epochs as a fraction of the run. The references' warmups (10 or 15
    epochs) are written for runs of 100-1000 epochs: in a short run they would take the whole
    run, so they are capped at a tenth of it, with a notice (give the flag to keep more)."""
    share = epochs / max_epochs
    if share <= 0.1:
        return share
    print0(f"notice: the recipe's --{key.replace('_', '-')} of {epochs!r} is {share:.0%} of "
           f"--max-epochs {max_epochs}: using a tenth of the run (give "
           f"--{key.replace('_', '-')} to set it)")
    return 0.1


def resolve_learning_rate(args, global_batch: int) -> None:
    """--learning-rate is the peak lr as used; unset, it is --base-learning-rate x global batch
    / 256. A --base-learning-rate on the command line wins over a recipe's --learning-rate."""
    if "base_learning_rate" in args.explicit and "learning_rate" not in args.explicit:
        args.learning_rate = None
    if args.learning_rate is None:
        args.learning_rate = args.base_learning_rate * global_batch / 256


def learning_rate_rule(args, global_batch: int) -> str:
    """How the peak lr came about, for the start line."""
    if getattr(args, "base_learning_rate", None) is None or "learning_rate" in args.explicit:
        return "as given, not batch-scaled"
    return f"base {args.base_learning_rate:g} x {global_batch} / 256"


def describe_run(args) -> str:
    """For the start of a run: every flag as resolved, sorted, then one line with the recipe
    family and what the command line changed."""
    changed = ", ".join("--" + k.replace("_", "-") for k in args.explicit) or "nothing"
    flags = "\n".join(f"  {k}: {v}" for k, v in sorted(vars(args).items()))
    return (f"{flags}\nrecipe {args.recipe} ({args.dataset}, {args.image_size} px, mean "
            f"{args.mean}, std {args.std}); set on the command line: {changed}")
