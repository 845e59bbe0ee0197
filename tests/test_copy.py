"""Copying one method into another project, as README tells: the method's folder plus common/
work on their own in an empty directory, no method imports another, and README's line count
of what is copied is the real one."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

METHODS = ["mmcr", "nnclr", "densecl", "msn"]


def imported_packages(folder: Path) -> set:
    """The first component of every module that the .py files of `folder` import."""
    found = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("method", METHODS)
def test_a_method_imports_only_itself_and_common(method):
    assert not imported_packages(ROOT / method) & (set(METHODS) - {method})
    assert not imported_packages(ROOT / "common") & set(METHODS)  # common knows no method


def copied_lines(method: str) -> int:
    return sum(len(p.read_text().splitlines()) for folder in (method, "common")
               for p in (ROOT / folder).glob("*.py"))


def test_readme_states_the_lines_a_copy_holds():
    table = dict(re.findall(r"\| `(\w+)/` \+ `common/` \| ([\d,]+) \|",
                            (ROOT / "README.md").read_text()))
    assert {m: int(n.replace(",", "")) for m, n in table.items()} == \
        {m: copied_lines(m) for m in METHODS}


def test_a_copied_method_pretrains_and_finetunes_on_its_own(tmp_path):
    for folder in ("mmcr", "common"):
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the repo

    def run(*argv):
        done = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, timeout=300,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]

    run("mmcr/pretrain.py", "--dataset", "synthetic", "--image-size", "16", "--dev", "64",
        "--batch-size", "16", "--num-views", "2", "--max-epochs", "1", "--num-workers", "0",
        "--num-neighbours", "10", "--output-dir", "runs/copy")
    run("mmcr/finetune.py", "--checkpoint", "runs/copy/last.pt", "--max-epochs", "1",
        "--batch-size", "16", "--num-workers", "0")
    assert (tmp_path / "runs" / "copy" / "finetune-linear" / "last.pt").is_file()
