"""Every pretrain.py / finetune.py command that README.md shows parses with the flags it uses."""
import importlib
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands():
    """(script, argv) of each command line in README's bash blocks (after torchrun or &&)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():  # joins continued lines
        for command in line.split("&&"):
            words = shlex.split(command.replace("<", "").replace(">", ""), comments=True)
            words = words[:-1] if words[-1:] == ["&"] else words  # run in the background
            scripts = [i for i, w in enumerate(words)
                       if re.fullmatch(r"(mmcr|nnclr|densecl|msn)/(pretrain|finetune)\.py", w)]
            if scripts:
                yield words[scripts[0]], words[scripts[0] + 1:]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """An ImageNet-size image folder (one 256 px image in train/a and val/a)."""
    root = tmp_path_factory.mktemp("photos")
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        Image.new("RGB", (256, 256)).save(root / split / "a" / "0.png")
    return root


@pytest.mark.parametrize("script, argv", list(readme_commands()))
def test_readme_command_parses(script, argv, photo_folder):
    module = importlib.import_module(script[:-3].replace("/", "."))
    if "--data-dir" in argv and not Path(argv[argv.index("--data-dir") + 1]).exists():
        argv = [*argv, "--data-dir", str(photo_folder)]  # a placeholder such as /data/imagenet
    if script.endswith("pretrain.py"):
        module.get_args(argv)
    else:  # a finetune.py with flags of its own has get_args
        from common.finetune import finetune_args
        getattr(module, "get_args", finetune_args("").parse_args)(argv)


def test_readme_shows_every_method():
    scripts = {script for script, _ in readme_commands()}
    assert {f"{m}/{s}.py" for m in ("mmcr", "nnclr", "densecl", "msn")
            for s in ("pretrain", "finetune")} <= scripts
