"""Every pretrain.py / finetune.py command that README.md shows parses with the flags it uses."""
import importlib
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands():
    """(script, argv) of each command line in README's bash blocks (after torchrun or &&)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    for line in "\n".join(blocks).splitlines():
        for command in line.split("&&"):
            words = shlex.split(command.replace("<", "").replace(">", ""), comments=True)
            scripts = [i for i, w in enumerate(words)
                       if re.fullmatch(r"(mmcr|nnclr|densecl|msn)/(pretrain|finetune)\.py", w)]
            if scripts:
                yield words[scripts[0]], words[scripts[0] + 1:]


@pytest.mark.parametrize("script, argv", list(readme_commands()))
def test_readme_command_parses(script, argv):
    module = importlib.import_module(script[:-3].replace("/", "."))
    if script.endswith("pretrain.py"):
        module.get_args(argv)
    else:
        from common.finetune import finetune_args
        finetune_args("").parse_args(argv)


def test_readme_shows_every_method():
    scripts = {script for script, _ in readme_commands()}
    assert {f"{m}/{s}.py" for m in ("mmcr", "nnclr", "densecl", "msn")
            for s in ("pretrain", "finetune")} <= scripts
