"""Recipes: a method's defaults for one family of data (cifar, stl10, imagenet).

A method writes RECIPES = {family: {flag: value}} in its pretrain.py. use_recipes() leaves those
flags unset unless given and writes every family's value into their --help; apply_recipe()
picks the family (--recipe, or auto from the dataset and the image size) and fills each flag
the command line left unset. A flag given explicitly always wins.
"""
import argparse

from common.data import data_family, resolve_data
from common.train import FAMILIES


class Epochs(float):
    """A recipe value in epochs for a flag that takes a fraction of the run (--warmup-duration):
    Epochs(10) becomes 10 / --max-epochs, so a shorter run keeps the recipe's 10 epochs."""

    def __repr__(self):
        return f"{float(self):g} epochs"


def _show(value) -> str:
    return "unset" if value is None else repr(value) if isinstance(value, Epochs) else str(value)


def use_recipes(parser: argparse.ArgumentParser, recipes: dict) -> None:
    """Make each flag set by `recipes` unset by default (absent from the parsed namespace unless
    given) and append each family's value to its help."""
    keys = set(recipes["cifar"])
    assert set(recipes) == set(FAMILIES) and all(set(r) == keys for r in recipes.values())
    actions = {a.dest: a for a in parser._actions if a.dest in keys}
    assert set(actions) == keys, f"recipe keys without a flag: {keys - set(actions)}"
    for key, action in actions.items():
        values = [_show(recipes[f][key]) for f in FAMILIES]
        text = values[0] if len(set(values)) == 1 else ", ".join(
            f"{f} {v}" for f, v in zip(FAMILIES, values))
        action.default = argparse.SUPPRESS
        action.help = f"{action.help} (default: {text})"


def apply_recipe(args, recipes: dict) -> None:
    """Resolve --recipe auto, fill every unset recipe flag, then the data's image size and
    normalisation. args.explicit lists the recipe flags the command line set."""
    if args.recipe == "auto":
        args.recipe = data_family(args.dataset, args.data_dir, args.image_size)
    recipe = recipes[args.recipe]
    args.explicit = sorted(k for k in recipe if hasattr(args, k))
    for key in recipe.keys() - set(args.explicit):
        setattr(args, key, recipe[key])
    for key in recipe:
        if isinstance(getattr(args, key), Epochs):
            setattr(args, key, min(1.0, getattr(args, key) / args.max_epochs))
    resolve_data(args)


def describe_recipe(args) -> str:
    """One line for the start of a run: the recipe family and what the command line changed."""
    changed = ", ".join("--" + k.replace("_", "-") for k in args.explicit) or "nothing"
    return (f"recipe {args.recipe} ({args.dataset}, {args.image_size} px, mean {args.mean}, "
            f"std {args.std}); set on the command line: {changed}")
