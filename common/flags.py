"""Flags: a plain argparse parser with one-line errors, number types that refuse nan and
out-of-range values, the flags every pretrain.py shares, and the functions that resolve them,
once, in each get_args(): the command line (for a resumed run, its own flags where the command
line is silent), then the recipe (a dict of a method's defaults for one family of data), then
the data and the machine. A flag a recipe sets has no argparse default: it is absent from
`args` until fill_recipe() sets it, and its help lists every recipe's value."""
import argparse
import math

from common.checkpoint import OF_THIS_COMMAND, resolve_output_dir, resume_point
from common.data import DATASETS, FAMILIES, data_family, resolve_data
from common.dist import print0
from common.errors import UserError
from common.runtime import cpu_cores


def parser(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser that shows defaults in --help, takes flags only as spelled in full,
    and says what is wrong in one line (exit code 2) instead of its usage."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def one_line(message):
        p.exit(2, f"error: {message} (see --help)\n")
    p.error = one_line
    return p


def number(kind=float, low=-math.inf, high=math.inf, open_low=False, open_high=False):
    """argparse type: a finite number in [low, high] (an open end excludes its bound), else a
    one-line error naming the flag. nan and inf are refused whatever the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
        if value < low or (open_low and value == low):
            raise argparse.ArgumentTypeError(
                "must be positive" if (low, open_low) == (0, True) else
                f"must be {'above' if open_low else 'at least'} {low:g} (got {text})")
        if value > high or (open_high and value == high):
            raise argparse.ArgumentTypeError(
                f"must be {'below' if open_high else 'at most'} {high:g} (got {text})")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def at_least(minimum, kind=int):
    """argparse type: a number >= minimum."""
    return number(kind, low=minimum)


positive = number(low=0, open_low=True)  # a float > 0
fraction = number(low=0, high=1)  # a float in [0, 1]
momentum = number(low=0, high=1, open_high=True)  # an EMA momentum: [0, 1)


def by_recipe(recipes: dict, key: str, none: str = "unset") -> str:
    """Help text: the value of `key` in each recipe, as '(recipe: cifar 64, stl10 64, ...)'
    (one value when all agree; None reads `none`). A `warmup_epochs` value reads 'N epochs'."""
    def show(recipe):
        if key == "warmup_duration" and "warmup_epochs" in recipe:
            return f"{recipe['warmup_epochs']:g} epochs"
        value = recipe[key]
        return none if value is None else " ".join(map(str, value)) \
            if isinstance(value, list) else str(value)
    values = [show(recipes[family]) for family in FAMILIES]
    text = values[0] if len(set(values)) == 1 else ", ".join(
        f"{f} {v}" for f, v in zip(FAMILIES, values))
    return f"(recipe: {text})"


def add_common_args(p, recipes: dict, *, knn_temperature: float = 0.5) -> None:
    """The flags every pretrain.py shares (MMCR playground spellings); those a recipe sets
    (batch size, epochs, learning rates, warmup, weight decay) have the recipe's values."""
    a = p.add_argument
    recipe = dict(default=argparse.SUPPRESS)
    a("--dataset", default="cifar10", choices=DATASETS,
      help="synthetic is generated in-process and needs no files (offline smoke runs)")
    a("--data-dir", default="data", help="where datasets live (CIFAR/STL download here); "
      "imagefolder: a root of train/ and val/ class folders, of class folders (--holdout), or "
      "of unlabelled images")
    a("--recipe", default="auto", choices=["auto", *FAMILIES], help="the method's defaults for "
      "this kind of data; auto: cifar for CIFAR/synthetic, stl10 for STL-10, for an image "
      "folder by image size (to 48 px cifar, to 128 px stl10, else imagenet); flags win")
    a("--image-size", type=at_least(1), default=None, help="crop size; unset: the dataset's "
      "(32 CIFAR/synthetic, 64 STL-10), for an image folder the recipe's (32/64/224)")
    a("--mean", type=number(), nargs=3, default=None, help="normalisation mean (RGB); unset: "
      "the dataset's, for an image folder the recipe's (CIFAR-10 / STL-10 / ImageNet constants)")
    a("--std", type=positive, nargs=3, default=None, help="normalisation std (RGB); unset: as "
      "--mean")
    a("--holdout", type=number(low=0, high=1, open_low=True, open_high=True), default=0.2,
      help="an image folder of class folders (no train/, val/): the share of each class held "
      "out (a fixed draw) as the test split of the kNN monitor and the probe")
    a("--batch-size", type=at_least(1), **recipe, help="images per process per step (the "
      f"global batch is this x world size) {by_recipe(recipes, 'batch_size')}")
    a("--max-epochs", type=at_least(1), **recipe,
      help=f"pretraining epochs {by_recipe(recipes, 'max_epochs')}")
    a("--learning-rate", type=positive, **recipe, help="peak learning rate, as used (printed "
      f"at start) {by_recipe(recipes, 'learning_rate')}")
    if "base_learning_rate" in recipes["cifar"]:
        a("--base-learning-rate", type=positive, **recipe, help="peak learning rate per 256 "
          "images of global batch: used when --learning-rate is unset, as base x global batch "
          f"/ 256 {by_recipe(recipes, 'base_learning_rate')}")
    a("--warmup-duration", type=fraction, **recipe, help="linear warmup as a fraction of all "
      "steps (a recipe's epochs: at most a tenth), then cosine decay "
      f"{by_recipe(recipes, 'warmup_duration')}")
    a("--weight-decay", type=at_least(0, float), **recipe,
      help=f"weight decay {by_recipe(recipes, 'weight_decay')}")
    a("--num-neighbours", type=at_least(1), default=200, help="k of the kNN monitor")
    a("--temperature", type=positive, default=knn_temperature, help="kNN vote "
      "temperature T (weights exp(cos/T)); not a loss temperature")
    a("--eval-every", type=at_least(0), default=1, help="kNN every N epochs (0: never)")
    a("--dev", type=at_least(0), nargs="?", const=2048, default=0, help="a fixed sample of N "
      "images per split (N/4 of the test split), class by class, for a quick look (2048 when "
      "given without N; 0: all)")
    a("--output-dir", default=None, help="run directory; unset: runs/<method>/<dataset>-<time>")
    a("--resume", default=None, help="checkpoint path, or 'auto' for last.pt of --output-dir "
      "(or of the newest run of this method)")
    a("--save-every", type=at_least(0), default=0, help="also keep epochNNNN.pt every N epochs "
      "(0: off)")
    a("--checkpoint-every", type=at_least(0, float), default=30, help="also write last.pt every "
      "N minutes of training, part-way through an epoch (0: at epoch ends only)")
    a("--log-every", type=at_least(1), default=50, help="steps between TensorBoard/progress "
      "updates (the only steps that read values back from the device)")
    a("--seed", type=int, default=42, help="random seed (each process uses seed + rank)")
    a("--compile", action="store_true", help="torch.compile the training forward")
    a("--augment", help=argparse.SUPPRESS, default=argparse.SUPPRESS, type=removed(
        "views are always made on the training device (PIL's are the tests' reference)"))
    add_machine_args(p)


def removed(why: str):
    """argparse type of a flag that no longer exists: one line saying so."""
    def parse(text):
        raise argparse.ArgumentTypeError(f"this flag was removed: {why}")
    return parse


def add_machine_args(p) -> None:
    """--precision, --threads, --device, --num-workers, --dist-timeout: how this machine runs
    the job (pretrain.py and finetune.py alike)."""
    a = p.add_argument
    a("--num-workers", type=at_least(0), default=min(8, cpu_cores()),
      help="DataLoader workers per process (the cores this process may use, at most 8)")
    a("--dist-timeout", type=positive, default=10, help="minutes a collective waits for a "
      "missing rank before the run fails (torchrun)")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="autocast dtype for the networks (losses always run in float32); auto: bf16 on a "
      "CUDA GPU that supports it, else fp32 (on a CPU with AVX512-BF16 or AMX, bf16 runs "
      "about 2.5x faster: pass it explicitly)")
    a("--threads", type=at_least(1), default=None, help="torch intra-op threads per process; "
      "unset: this process's share of the cores (printed at start)")
    a("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if present")


def parse(p, argv, method: str, recipes: dict):
    """The command line with --output-dir (for --resume auto the newest run of `method`),
    --resume (the checkpoint to continue, or None) and args.explicit (the flags it gave). A
    resumed run takes each flag the command line leaves unset from its checkpoint (or its
    args.json, killed before a checkpoint), except this machine's: `--output-dir RUN --resume
    auto` alone continues RUN as started. A contradicting flag is refused later."""
    args = parse_command_line(p, argv)
    args.output_dir = str(resolve_output_dir(args, method))
    resume, saved = resume_point(args, method)
    args.resume = str(resume) if resume else None
    flags = set(vars(args)).union(*recipes.values())  # a flag the run has, recipe flags too
    for key, value in saved.items():
        if key in flags and key not in args.explicit and key not in OF_THIS_COMMAND:
            setattr(args, key, value)
    return args


def parse_command_line(p, argv):
    """The flags, with args.explicit: those the command line gave, sorted (argparse leaves the
    attributes a namespace already holds alone unless the command line sets them)."""
    args, unset = p.parse_args(argv), object()
    given = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    args.explicit = sorted(k for k, v in vars(given).items() if v is not unset)
    return args


def fill_recipe(args, recipes: dict) -> None:
    """Resolve --recipe auto, put the recipe's value in every flag the command line left unset,
    then the data's image size and normalisation. A recipe's `warmup_epochs` becomes
    --warmup-duration as a share of the run, at most a tenth of it."""
    if args.recipe == "auto":
        args.recipe = data_family(args.dataset, args.data_dir, args.image_size)
    recipe = recipes[args.recipe]
    for key, value in recipe.items():
        if key != "warmup_epochs" and not hasattr(args, key):
            setattr(args, key, value)
    if not hasattr(args, "warmup_duration"):
        args.warmup_duration = share_of_run(recipe["warmup_epochs"], args.max_epochs)
    resolve_data(args)


def share_of_run(epochs: float, max_epochs: int) -> float:
    """A recipe's warmup in epochs as a fraction of the run, at most a tenth of it (with a
    notice): the references' 10 or 15 epochs are meant for runs of 100-1000 epochs."""
    share = epochs / max_epochs
    if share <= 0.1:
        return share
    print0(f"notice: the recipe's --warmup-duration of {epochs:g} epochs is {share:.0%} of "
           f"--max-epochs {max_epochs}: using a tenth of the run (give --warmup-duration to "
           "set it)")
    return 0.1


def refuse_unused(args, unused: dict) -> None:
    """One error line for a flag the command line gave that the settings do not use: `unused`
    maps a flag's destination to why it does not apply (or to None)."""
    for key, why in unused.items():
        if why and key in args.explicit:
            raise UserError(f"--{key.replace('_', '-')} does not apply here: {why}")


def resolve_learning_rate(p, args, global_batch: int) -> None:
    """--learning-rate is the peak lr as used; unset, --base-learning-rate x global batch / 256
    (which, on the command line, wins over a recipe's --learning-rate; not both given)."""
    if {"base_learning_rate", "learning_rate"} <= set(args.explicit):
        p.error("give --learning-rate (the peak) or --base-learning-rate (per 256 images), "
                "not both")
    if "base_learning_rate" in args.explicit:
        args.learning_rate = None
    if args.learning_rate is None:
        args.learning_rate = args.base_learning_rate * global_batch / 256


def cap_queue(size: int, limit: int, flag: str, why: str) -> int:
    """`size`, or `limit` (a multiple of the global batch) when `size` is larger, with a notice
    saying `why`; a limit of 0 (less data than a global batch) is the loader's to refuse."""
    if size <= limit or limit == 0:
        return size
    print0(f"notice: {flag} {size} {why}: using {limit}")
    return limit
