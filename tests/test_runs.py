"""A run as a user meets it, through MMCR's scripts and common/ (flags, checkpoint, log,
signals, finetune, data): what is printed, what is written, what is refused."""
import argparse
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common import backbone
from common.checkpoint import load_checkpoint
from common.errors import run_main
from helpers import ROOT, fails, read_metrics, use_tiny_cnn
from mmcr import finetune, pretrain
from mmcr import model as mmcr_model

TINY = ["--dataset", "synthetic", "--image-size", "16", "--batch-size", "8", "--num-views", "2",
        "--num-workers", "0", "--num-neighbours", "10", "--log-every", "1"]


@pytest.fixture
def tiny(monkeypatch):
    use_tiny_cnn(monkeypatch, mmcr_model)
    use_tiny_cnn(monkeypatch, backbone)


@pytest.fixture
def pretrained(tmp_path, tiny):
    """A finished 1-epoch run on 32 images (--dev 32)."""
    run = tmp_path / "run"
    pretrain.main([*TINY, "--dev", "32", "--max-epochs", "1", "--output-dir", str(run)])
    return run


def test_finetune_follows_the_checkpoint_and_refuses_a_second_run(pretrained, tiny, capsys):
    capsys.readouterr()
    flags = ["--checkpoint", str(pretrained / "last.pt"), "--batch-size", "8", "--max-epochs",
             "1", "--num-workers", "0"]
    finetune.main(flags)
    out = capsys.readouterr().out
    assert "finetune (linear, BatchNorm frozen): 32 images, 10 classes" in out  # --dev 32 kept
    assert not re.search(r"\d\.\d{5,}", out), out  # rounded numbers only
    before = sorted(p.name for p in (pretrained / "finetune-linear").iterdir())
    fails(finetune.main, flags, capsys, "already holds a finetune run")
    assert sorted(p.name for p in (pretrained / "finetune-linear").iterdir()) == before
    assert len(read_metrics(pretrained / "finetune-linear")) == 1


def test_finetune_bad_input_is_one_line(pretrained, capsys):
    ckpt = ["--checkpoint", str(pretrained / "last.pt")]
    fails(finetune.main, [*ckpt, "--dataset", "cifar11"], capsys, "invalid choice: 'cifar11'")
    fails(finetune.main, [*ckpt, "--batch-size", "-1"], capsys, "--batch-size: must be at "
          "least 1")
    fails(finetune.main, [*ckpt, "--max-epochs", "0"], capsys, "--max-epochs: must be at least 1")
    assert not (pretrained / "finetune-linear").exists()


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_no_epochs_is_an_error(epochs, tmp_path, capsys):
    fails(pretrain.main, [*TINY, "--max-epochs", epochs, "--output-dir", str(tmp_path / "r")],
          capsys, "--max-epochs: must be at least 1")
    assert not (tmp_path / "r").exists()


def test_refused_resume_writes_nothing(pretrained, tmp_path, tiny, capsys):
    other = tmp_path / "other.pt"
    torch.save({"method": "nnclr", "model": {}, "args": {}}, other)
    new = tmp_path / "new"
    fails(pretrain.main, [*TINY, "--output-dir", str(new), "--resume", str(other)], capsys,
          "'nnclr'")
    fails(pretrain.main, [*TINY, "--dev", "32", "--max-epochs", "1", "--output-dir", str(new),
                          "--resume", str(pretrained / "best.pt")], capsys, "weights only")
    fails(pretrain.main, [*TINY, "--dev", "32", "--max-epochs", "1", "--num-views", "3",
                          "--output-dir", str(new), "--resume", str(pretrained / "last.pt")],
          capsys, "--num-views: the checkpoint has 2, this command 3")
    assert not new.exists()


def test_best_holds_weights_only_and_knn_is_one_curve(pretrained, tiny, capsys):
    best = torch.load(pretrained / "best.pt", weights_only=True)
    last = torch.load(pretrained / "last.pt", weights_only=True)
    assert "optimizer" not in best and "rng" not in best and "optimizer" in last
    assert best["model"].keys() == last["model"].keys()
    assert (pretrained / "best.pt").stat().st_size < 0.6 * (pretrained / "last.pt").stat().st_size
    events = EventAccumulator(str(pretrained)).Reload()
    assert [e.step for e in events.Scalars("knn/top1")] == [0, 4]  # untrained, after epoch 1
    assert not [t for t in events.Tags()["scalars"] if t.startswith("epoch/knn")]
    finetune.main(["--checkpoint", str(pretrained / "best.pt"), "--batch-size", "8",
                   "--max-epochs", "1", "--num-workers", "0"])


def test_untrained_knn_is_printed(tmp_path, tiny, capsys):
    pretrain.main([*TINY, "--dev", "16", "--max-epochs", "1", "--output-dir", str(tmp_path)])
    epoch0 = read_metrics(tmp_path)[0]
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("epoch 0"))
    assert f"knn_top1 {epoch0['knn_top1']:.2f}" in line, line


def _image_folder(root, size, per_class=8, classes=("a", "b")):
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                colour = (40 * i, 255 - 40 * i, 128 if c == "a" else 0)
                Image.new("RGB", (size, size), colour).save(root / split / c / f"{i}.png")
    return root


def test_truncated_image_is_skipped_with_a_warning(tmp_path, tiny, capsys):
    root = _image_folder(tmp_path / "data", 16)
    bad = root / "train" / "a" / "3.png"
    bad.write_bytes(bad.read_bytes()[:40])  # cut off mid-file
    pretrain.main(["--dataset", "imagefolder", "--data-dir", str(root), "--batch-size", "4",
                   "--num-views", "2", "--num-workers", "0", "--max-epochs", "1",
                   "--num-neighbours", "5", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert f"skipping unreadable image {bad}" in err and "1 unreadable so far" in err
    assert (tmp_path / "run" / "last.pt").exists()


def test_image_folder_without_class_folders_is_one_line(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        Image.new("RGB", (16, 16)).save(tmp_path / split / "x.png")
    fails(pretrain.main, [*TINY, "--dataset", "imagefolder", "--data-dir", str(tmp_path),
                          "--output-dir", str(tmp_path / "r")], capsys, "no class folders")


def test_a_removed_flag_says_so_in_one_line(tmp_path, capsys):
    fails(pretrain.main, [*TINY, "--augment", "pil", "--output-dir", str(tmp_path / "r")],
          capsys, "--augment: this flag was removed: views are always made on the training "
          "device")
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_of_an_older_version_resumes_and_finetunes(tmp_path, tiny, capsys):
    # last.pt as the version before this one wrote it: a flag that no longer exists
    # (--augment) in its args, and each rank's running sums without a "meter"
    flags = [*TINY, "--dev", "32", "--ema", "0.9", "--eval-every", "0",
             "--output-dir", str(tmp_path)]
    pretrain.main([*flags, "--max-epochs", "1"])
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["args"]["augment"] = "pil"
    ckpt["ranks"] = [{"rng": ckpt["ranks"][0]["rng"], "sums": {}, "wait": 0.0, "seconds": 0.0}]
    torch.save(ckpt, tmp_path / "last.pt")
    capsys.readouterr()
    fails(pretrain.main, [*TINY, "--dev", "32", "--eval-every", "0", "--max-epochs", "2",
                          "--ema", "off", "--output-dir", str(tmp_path), "--resume", "auto"],
          capsys, "--ema: the checkpoint has 0.9, this command None")
    pretrain.main(["--output-dir", str(tmp_path), "--resume", "auto", "--max-epochs", "2"])
    assert load_checkpoint(tmp_path / "last.pt", "mmcr")["args"]["ema"] == 0.9
    assert read_metrics(tmp_path)[-1]["epoch"] == 2
    finetune.main(["--checkpoint", str(tmp_path / "last.pt"), "--batch-size", "8",
                   "--max-epochs", "1", "--num-workers", "0"])


def test_a_start_over_moves_the_earlier_logs_aside(tmp_path, tiny, capsys):
    flags = [*TINY, "--dev", "16", "--max-epochs", "1", "--eval-every", "0", "--num-views", "3",
             "--output-dir", str(tmp_path)]
    pretrain.main(flags)
    for name in ("last.pt", "backbone.pt"):  # as a run killed before its first checkpoint
        (tmp_path / name).unlink()
    capsys.readouterr()
    pretrain.main(["--output-dir", str(tmp_path), "--resume", "auto"])  # README's line
    out = capsys.readouterr().out
    assert "starting over with the flags of its args.json" in out  # not the defaults
    assert "starting over, its logs moved to" in out
    assert json.loads((tmp_path / "args.json").read_text())["num_views"] == 3
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1]  # one run, not two
    (aside,) = tmp_path.glob("stopped-*")
    assert len(read_metrics(aside)) == 1 and (aside / "args.json").is_file()
    assert len(list(tmp_path.glob("events.out.tfevents*"))) == 1


def test_a_non_image_first_in_its_folder_is_skipped(tmp_path, tiny, capsys):
    root = _image_folder(tmp_path / "data", 16)
    bad = root / "train" / "a" / "0 notes.png"  # sorts first; the size probe meets it first
    bad.write_text("not an image")
    pretrain.main(["--dataset", "imagefolder", "--data-dir", str(root), "--batch-size", "4",
                   "--num-views", "2", "--num-workers", "0", "--max-epochs", "1",
                   "--num-neighbours", "5", "--output-dir", str(tmp_path / "run")])
    assert f"skipping unreadable image {bad}" in capsys.readouterr().err
    assert (tmp_path / "run" / "last.pt").exists()


def test_a_folder_without_a_readable_image_is_one_line(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_text("not an image")
    fails(pretrain.main, ["--dataset", "imagefolder", "--data-dir", str(tmp_path)], capsys,
          "no readable images")


def test_a_run_folder_as_checkpoint_names_its_last_pt(pretrained, capsys):
    fails(finetune.main, ["--checkpoint", str(pretrained)], capsys,
          f"is a folder, not a file: give its last.pt ({pretrained / 'last.pt'})")


def test_a_probe_on_fewer_images_than_a_batch_takes_them_all(pretrained, tiny, capsys):
    finetune.main(["--checkpoint", str(pretrained / "last.pt"), "--max-epochs", "1",
                   "--num-workers", "0"])  # the default batch of 1024, 32 images
    out = capsys.readouterr().out
    assert "32 training images, fewer than one global batch (1024 x 1)" in out
    assert len(read_metrics(pretrained / "finetune-linear")) == 1


class Stop(Exception):
    """Stands for a kill in the middle of training."""


def test_resume_with_only_the_run_folder_continues_the_run_as_started(tmp_path, tiny,
                                                                       monkeypatch, capsys):
    # README's line: `python mmcr/pretrain.py --output-dir runs/mmcr/<run> --resume auto`
    root, run = _image_folder(tmp_path / "data", 16), tmp_path / "run"
    step, calls = pretrain.train_step, []

    def stopping(*args):
        calls.append(1)
        if len(calls) == 6:
            raise Stop
        return step(*args)

    monkeypatch.setattr(pretrain, "train_step", stopping)
    with pytest.raises(Stop):  # 16 images / batch 4: stopped in epoch 2 of 3
        pretrain.main(["--dataset", "imagefolder", "--data-dir", str(root), "--batch-size", "4",
                       "--num-views", "3", "--num-workers", "0", "--max-epochs", "3",
                       "--num-neighbours", "5", "--output-dir", str(run)])
    monkeypatch.setattr(pretrain, "train_step", step)
    capsys.readouterr()
    pretrain.main(["--output-dir", str(run), "--resume", "auto"])
    assert "set on the command line: --output-dir, --resume" in capsys.readouterr().out
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3] and records[-1]["step"] == 12
    args = load_checkpoint(run / "last.pt", "mmcr")["args"]
    assert (args["dataset"], args["data_dir"], args["num_views"]) == ("imagefolder", str(root), 3)


def _class_folders(root, size=16, per_class=10, classes=("a", "b", "c", "d")):
    """root/<class>/*.png, as ../shared/data/cifar10-5k is laid out (no train/ or val/)."""
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (60 * k, 20 * i, 128)).save(root / c / f"{i}.png")
    return root


def test_one_folder_per_class_is_labelled_with_a_held_out_split(tmp_path, tiny, capsys):
    root, run = _class_folders(tmp_path / "data"), tmp_path / "run"
    pretrain.main(["--dataset", "imagefolder", "--data-dir", str(root), "--batch-size", "4",
                   "--num-views", "2", "--num-workers", "0", "--max-epochs", "1",
                   "--num-neighbours", "5", "--output-dir", str(run)])
    assert "kNN monitor off" not in capsys.readouterr().out
    assert "knn_top1" in read_metrics(run)[-1] and (run / "best.pt").is_file()
    finetune.main(["--checkpoint", str(run / "last.pt"), "--max-epochs", "1",
                   "--num-workers", "0"])
    # 2 of each class's 10 images held out (--holdout 0.2): 32 to train on, the same split
    assert "32 training images" in capsys.readouterr().out


def test_dev_samples_every_class_of_a_sorted_folder(tmp_path, tiny, capsys):
    root = _class_folders(tmp_path / "data")
    pretrain.main(["--dataset", "imagefolder", "--data-dir", str(root), "--batch-size", "4",
                   "--num-views", "2", "--num-workers", "0", "--max-epochs", "1", "--dev", "8",
                   "--eval-every", "0", "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    # the first 8 in class order would all be class a
    assert "--dev: a fixed sample of 8 of 32 images, 4 classes" in out, out


def test_resume_auto_without_a_run_says_it_starts_a_new_one(tmp_path, tiny, capsys):
    pretrain.main([*TINY, "--dev", "16", "--max-epochs", "1", "--eval-every", "0",
                   "--output-dir", str(tmp_path / "new"), "--resume", "auto"])
    assert "holds no run to resume; starting a new one" in capsys.readouterr().out
    assert (tmp_path / "new" / "last.pt").is_file()


def test_ctrl_c_checkpoints_at_the_step_and_exits_130(tmp_path, tiny, monkeypatch, capsys):
    step, calls = pretrain.train_step, []

    def interrupted(*args):  # Ctrl-C arrives during the third step
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step(*args)
    monkeypatch.setattr(pretrain, "train_step", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        run_main(pretrain.main, [*TINY, "--dev", "64", "--max-epochs", "1", "--eval-every", "0",
                                 "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 130
    assert "last.pt holds step 3 (epoch 1, batch 3)" in capsys.readouterr().err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_a_finished_run_says_so_and_keeps_its_record(tmp_path, tiny, capsys):
    flags = [*TINY, "--dev", "16", "--max-epochs", "1", "--eval-every", "0",
             "--output-dir", str(tmp_path)]
    pretrain.main(flags)
    record = (tmp_path / "args.json").read_text()
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    pretrain.main(["--output-dir", str(tmp_path), "--resume", "auto", "--num-workers", "1"])
    assert "has finished all 1 epochs: nothing to do" in capsys.readouterr().out
    assert (tmp_path / "args.json").read_text() == record  # the first record, as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no new event file


def test_a_changed_data_dir_on_resume_is_refused(tmp_path, tiny, capsys):
    root = _class_folders(tmp_path / "data")
    flags = ["--dataset", "imagefolder", "--batch-size", "4", "--num-views", "2",
             "--num-workers", "0", "--max-epochs", "1", "--eval-every", "0", "--output-dir",
             str(tmp_path / "run")]
    pretrain.main([*flags, "--data-dir", str(root)])
    other = _class_folders(tmp_path / "other", classes=("a", "b"))
    capsys.readouterr()
    fails(pretrain.main, [*flags, "--data-dir", str(other), "--max-epochs", "2", "--resume",
                          "auto"], capsys, f"--data-dir: the checkpoint has {root}")


SCRIPTS = [f"{m}.{s}" for m in ("mmcr", "nnclr", "densecl", "msn")
           for s in ("pretrain", "finetune")]


def parser_of(script: str, monkeypatch):
    """The parser of `script`, caught as get_args builds it (--help exits before anything
    runs)."""
    from common import flags
    made = []
    real = flags.parser
    module = importlib.import_module(script)
    monkeypatch.setattr(module if hasattr(module, "parser") else flags, "parser",
                        lambda *a: made.append(real(*a)) or made[-1])
    monkeypatch.setattr(importlib.import_module("common.finetune"), "parser",
                        lambda *a: made.append(real(*a)) or made[-1])
    with pytest.raises(SystemExit):
        module.get_args(["--help"])
    return made[0]


def float_flags(script: str, monkeypatch) -> list:
    """(flag, number of values) of each flag of `script` that takes numbers with a fraction."""
    return [(a.option_strings[0], a.nargs if isinstance(a.nargs, int) else 1)
            for a in parser_of(script, monkeypatch)._actions
            if getattr(a.type, "__name__", "") == "float"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default_and_every_recipes_value(script, monkeypatch, capsys):
    """Every flag has a help string; --help shows the default of each flag that has one, and
    each recipe's value of a flag a recipe sets (the values read from the script's RECIPES)."""
    p = parser_of(script, monkeypatch)
    capsys.readouterr()
    shown = [a for a in p._actions if a.help != argparse.SUPPRESS and a.dest != "help"]
    assert all(a.help for a in shown), [a.dest for a in shown if not a.help]
    by_default = [a for a in shown if a.default is not argparse.SUPPRESS]
    text = " ".join(p.format_help().split())
    assert text.count("(default: ") == len(by_default) > 10
    recipes = getattr(importlib.import_module(script), "RECIPES", {})
    by_recipe = [a for a in shown if a.default is argparse.SUPPRESS]
    assert len(by_recipe) >= (5 if recipes else 0)
    for a in by_recipe:
        help_text = " ".join(a.help.split())
        assert "(recipe: " in help_text, a.dest
        for recipe in recipes.values():
            value = recipe.get(a.dest)
            if a.dest == "warmup_duration" and "warmup_epochs" in recipe:
                value = f"{recipe['warmup_epochs']:g} epochs"
            for part in value if isinstance(value, list) else [value]:
                assert part is None or str(part) in help_text, (a.dest, part)


@pytest.mark.parametrize("script", SCRIPTS)
def test_nan_and_inf_in_any_float_flag_are_one_line(script, monkeypatch, capsys):
    main = importlib.import_module(script).main
    found = float_flags(script, monkeypatch)
    assert len(found) >= 4, found  # the learning rate, weight decay, ...
    capsys.readouterr()
    for flag, values in found:
        for value in ("nan", "inf"):
            argv = [flag, *[value] * values]
            if script.endswith("finetune"):
                argv = ["--checkpoint", "x.pt", *argv]
            fails(main, argv, capsys, f"{flag}: must be a finite number")


@pytest.mark.parametrize("flags, message", [
    (["--ema", "1.5"], "--ema: must be below 1 (got 1.5)"),
    (["--warmup-duration", "2"], "--warmup-duration: must be at most 1 (got 2)"),
    (["--optimizer", "adam", "--lars-eta", "0.01"], "--lars-eta does not apply here"),
    (["--learning-rate", "0.1", "--base-learning-rate", "0.2"], "not both"),
])
def test_values_out_of_range_or_unused_are_refused(flags, message, tmp_path, capsys):
    fails(pretrain.main, [*TINY, *flags, "--output-dir", str(tmp_path / "r")], capsys, message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--train-views", "pretrain", "--crop-interpolation", "bicubic"], "--crop-interpolation"),
    (["--lr-steps", "30", "40"], "--lr-steps does not apply here"),
    (["--finetune-type", "backbone+linear", "--linear-bn", "train"], "--linear-bn"),
])
def test_finetune_flags_that_do_not_apply_are_refused(pretrained, flags, message, capsys):
    fails(finetune.main, ["--checkpoint", str(pretrained / "last.pt"), *flags], capsys, message)


SLOW_RUN = """
import sys, time
sys.path.insert(0, {root!r})
from common.errors import run_main
from mmcr import pretrain
step = pretrain.train_step

def slow(*args):
    time.sleep(0.5)
    return step(*args)
pretrain.train_step = slow
run_main(pretrain.main)
"""


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path, capsys):
    script, run = tmp_path / "slow.py", tmp_path / "run"
    script.write_text(SLOW_RUN.format(root=str(ROOT)))
    flags = [*TINY, "--dev", "64", "--max-epochs", "2", "--eval-every", "0", "--output-dir",
             str(run), "--checkpoint-every", "0.001"]
    first = subprocess.Popen([sys.executable, str(script), *flags], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (run / "last.pt").exists():  # training, and written a checkpoint
            assert first.poll() is None
            time.sleep(0.1)
        fails(pretrain.main, [*flags, "--resume", "auto"], capsys,
              f"another process (pid {first.pid}) is writing {run}")
    finally:
        first.kill()  # SIGKILL: the kernel releases its lock
        first.wait()
    pretrain.main([*flags, "--resume", "auto"])
    assert read_metrics(run)[-1]["epoch"] == 2
