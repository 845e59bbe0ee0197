"""Tests of mmcr/: the loss against independent computations, DDP equivalence, the scripts."""
import pytest
import torch

from common import dist
from common.errors import run_main
from helpers import (fails, load_into_torchvision_resnet18, read_metrics, run_distributed,
                     run_script, straight_and_resumed, use_tiny_cnn)
from mmcr import finetune, pretrain
from mmcr import model as mmcr_model
from mmcr.model import MMCR, mmcr_loss

TINY = ["--dataset", "synthetic", "--image-size", "16", "--batch-size", "8", "--num-views", "2",
        "--num-workers", "0", "--num-neighbours", "10", "--log-every", "1"]


def naive_mmcr(z, lmbda, z_momentum=None):
    """Per-image loop in float64 with full SVDs: -||C||_* + lmbda * mean_b ||Z_b||_*."""
    centroids, local = [], 0.0
    for b in range(z.shape[0]):
        views = [v / v.norm() for v in z[b].double()]
        c = sum(views) / len(views)
        if z_momentum is not None:
            m = [v / v.norm() for v in z_momentum[b].double()]
            c = (c + sum(m) / len(m)) / 2
        centroids.append(c)
        local += torch.linalg.svd(torch.stack(views))[1].sum()
    return -torch.linalg.svd(torch.stack(centroids))[1].sum() + lmbda * local / z.shape[0]


def test_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    z, zm = torch.randn(6, 4, 5, generator=g), torch.randn(6, 4, 5, generator=g)
    assert mmcr_loss(z, lmbda=0.3)[0].item() == pytest.approx(naive_mmcr(z, 0.3).item(), 1e-5)
    assert mmcr_loss(z, zm)[0].item() == pytest.approx(naive_mmcr(z, 0, zm).item(), 1e-5)


def test_loss_closed_forms_orthogonal_centroids():
    eye = torch.eye(8)
    same = eye[:4, None, :].expand(4, 3, 8) * 7.0  # 3 identical views of 4 orthogonal images
    loss, logs = mmcr_loss(same, lmbda=1.0)
    assert logs["global_nuclear_norm"].item() == pytest.approx(4.0)  # 4 unit centroids
    # each Z_b is 3 equal unit rows: rank 1 with singular value sqrt(3)
    assert loss.item() == pytest.approx(-4.0 + 3 ** 0.5)
    # views e_b and e_{b+4}: centroids of norm 1/sqrt(2), orthogonal; each Z_b = 2 orthonormal rows
    split = torch.stack([eye[:4], eye[4:]], dim=1)
    loss, logs = mmcr_loss(split, lmbda=0.5)
    assert logs["global_nuclear_norm"].item() == pytest.approx(4 / 2 ** 0.5)
    assert logs["local_nuclear_norm"].item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(-4 / 2 ** 0.5 + 0.5 * 2.0)


def test_loss_is_invariant_to_embedding_scale():
    z = torch.randn(5, 3, 16)
    torch.testing.assert_close(mmcr_loss(z, lmbda=0.1)[0], mmcr_loss(z * 123.0, lmbda=0.1)[0])


@pytest.mark.parametrize("z", [torch.ones(4, 3, 32),  # identical views and images
                               torch.randn(1, 1, 32).expand(3, 2, 32).clone(),
                               torch.randn(2, 4, 64)])  # batch < dim
def test_gradients_finite_on_degenerate_inputs(z):
    z = z.clone().requires_grad_(True)
    mmcr_loss(z, lmbda=0.5)[0].backward()
    assert torch.isfinite(z.grad).all()


def test_momentum_update_is_the_ema():
    model = MMCR(image_size=16, hidden_dims=[8], projection_dim=4, momentum_branch=True)
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(1.0)
    old = [p.clone() for p in model.momentum_projector.parameters()]
    model.update_ema(0.9)
    for p_m, p, o in zip(model.momentum_projector.parameters(), model.projector.parameters(), old):
        torch.testing.assert_close(p_m, 0.9 * o + 0.1 * p)
    assert not any(p.requires_grad for p in model.momentum_backbone.parameters())


def _loss_and_grad(rank, world, x, x_momentum):
    """A linear 'network' on this rank's shard; grads averaged over ranks as DDP does."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[-1], 6)
    n = x.shape[0] // world
    shard = slice(rank * n, (rank + 1) * n)
    loss, _ = mmcr_loss(head(x[shard]), head(x_momentum[shard]).detach(), lmbda=0.2)
    loss.backward()
    grad = dist.all_reduce_mean(head.weight.grad) if world > 1 else head.weight.grad
    return loss.detach(), grad


def test_two_processes_equal_one_process(tmp_path):
    g = torch.Generator().manual_seed(1)
    x, xm = torch.randn(8, 3, 10, generator=g), torch.randn(8, 3, 10, generator=g)
    loss1, grad1 = _loss_and_grad(0, 1, x, xm)
    for loss2, grad2 in run_distributed(_loss_and_grad, 2, tmp_path, x, xm):
        torch.testing.assert_close(loss2, loss1)
        torch.testing.assert_close(grad2, grad1)


def _bias_updates(rank, world, x):
    """The update of a 1-D parameter (a Linear head's bias: LARS steps it with its plain
    gradient) in one LARS step after DDP's gradient average, for the loss with the global
    gradient, with `local_gradient`, and for the official ImageNet gather written out here:
    the other ranks' normalised views gathered without gradient, this rank's own put back."""
    n = x.shape[0] // world
    updates = {}
    for form in ("global", "local", "official"):
        torch.manual_seed(0)
        head = torch.nn.Linear(x.shape[-1], 6)
        z = head(x[rank * n:(rank + 1) * n])  # (n, V, 6)
        if form == "official":
            z = torch.nn.functional.normalize(z, dim=-1)
            parts = [torch.zeros_like(z) for _ in range(world)]
            if world > 1:
                torch.distributed.all_gather(parts, z.detach().contiguous())
            parts[rank] = z
            loss = -torch.linalg.svdvals(torch.cat(parts).mean(1)).sum()
        else:
            loss, _ = mmcr_loss(z, local_gradient=form == "local")
        loss.backward()
        for p in head.parameters():  # DDP: the mean over ranks
            p.grad = dist.all_reduce_mean(p.grad) if world > 1 else p.grad
        before = head.bias.detach().clone()
        pretrain.LARS(head.parameters(), lr=1.0, weight_decay=1e-6, eta=1e-3).step()
        updates[form] = head.bias.detach() - before
    return updates


def test_local_gradient_steps_a_1d_parameter_as_the_official_imagenet_code(tmp_path):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 2, 10, generator=g)  # 8 images x 2 views
    one = _bias_updates(0, 1, x)
    assert all(torch.allclose(one[form], one["global"]) for form in one)  # one process: alike
    for ranks in run_distributed(_bias_updates, 2, tmp_path, x):
        torch.testing.assert_close(ranks["local"], ranks["official"])
        torch.testing.assert_close(ranks["global"], one["global"])  # whatever the world size
        torch.testing.assert_close(ranks["local"], one["global"] / 2)  # 1/world size of it


def test_pretrain_then_finetune_end_to_end(tmp_path, capsys):
    # pretrain.py as a user runs it (a file from the repository root), finetune in-process:
    # a second subprocess would spend most of its time importing torch
    out = tmp_path / "run"
    result = run_script("mmcr/pretrain.py", *TINY, "--dev", "64", "--max-epochs", "1",
                        "--output-dir", out)
    assert result.returncode == 0, result.stderr
    assert "world size 1 | per process 8 images x 2 views = 16 crops" in result.stdout
    names = {p.name for p in out.iterdir()}
    assert {"args.json", "metrics.jsonl", "last.pt", "best.pt", "backbone.pt"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1] and "knn_top1" in records[1]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["method"] == "mmcr" and ckpt["epoch"] == 1 and ckpt["step"] == 8
    missing = load_into_torchvision_resnet18(out / "backbone.pt")
    assert missing.missing_keys == ["fc.weight", "fc.bias"] and not missing.unexpected_keys
    finetune.main(["--checkpoint", str(out / "last.pt"), "--dev", "64", "--batch-size", "16",
                   "--max-epochs", "1", "--num-workers", "0", "--train-views", "pretrain",
                   "--linear-bn", "train"])
    assert "loaded 120 backbone tensors" in capsys.readouterr().out
    record = read_metrics(out / "finetune-linear")[-1]
    assert 0 <= record["top1"] <= 100 and "top5" in record


@pytest.mark.parametrize("dataset, expected", [
    # ThomasYerxa/mmcr fafd3a9 mmcr/cifar_stl/data.py, the probe's train_transform=True:
    # CIFAR: crop 0.08-1 (bilinear), flip, jitter 0.4/0.4/0.4/0.1 p 0.8, gray 0.2;
    # STL-10: jitter and gray 0.1 first, then a bicubic crop 0.2-1 to 64 px and a flip
    ("cifar10", dict(size=32, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                     gray_p=0.2, colour_first=False, interpolation="bilinear")),
    ("stl10", dict(size=64, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                   gray_p=0.1, colour_first=True, interpolation="bicubic")),
])
def test_probe_on_the_pretraining_views_uses_the_official_probe_transform(dataset, expected,
                                                                         monkeypatch):
    pretrain_args = pretrain.get_args(["--dataset", dataset])
    monkeypatch.setattr(finetune, "load_pretrained", lambda *a: (None, 8, pretrain_args))
    seen = {}
    monkeypatch.setattr(finetune, "run_finetune", lambda *a, train_view: seen.update(v=train_view))
    finetune.main(["--checkpoint", "x.pt", "--train-views", "pretrain"])
    view = seen["v"](pretrain.get_args(["--dataset", dataset]))
    assert {k: getattr(view, k) for k in expected} == expected
    finetune.main(["--checkpoint", "x.pt"])
    assert seen["v"] is None  # the default: random resized crops and flips


def test_resume_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    flags = [*TINY, "--dev", "32", "--max-epochs", "2", "--eval-every", "0"]
    # 4 steps per epoch: SIGTERM, then a kill, at random steps
    a, b, stops = straight_and_resumed(pretrain, flags, tmp_path, monkeypatch)
    assert a["step"] == b["step"] == 8, stops
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), (k, stops)
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, capsys):
    flags = [*TINY, "--dev", "32", "--max-epochs", "1", "--output-dir", str(tmp_path / "r")]
    fails(pretrain.main, [*flags, "--dataset", "imagenet"], capsys, "invalid choice")
    fails(pretrain.main, [*flags, "--dataset", "cifar10", "--data-dir", str(tmp_path)], capsys,
           "cifar-10-batches-py")
    (tmp_path / "empty").mkdir()
    fails(pretrain.main, [*flags, "--dataset", "imagefolder", "--data-dir",
                           str(tmp_path / "empty")], capsys, "no images")
    fails(pretrain.main, [*flags, "--num-views", "1"], capsys, "--num-views")
    fails(pretrain.main, [*flags, "--batch-size", "1"], capsys, "BatchNorm")
    fails(pretrain.main, [*flags, "--dev", "4"], capsys, "fewer than one global batch")
    fails(pretrain.main, [*flags, "--image-size", "4"], capsys, "too small")
    fails(finetune.main, ["--checkpoint", str(tmp_path / "none.pt")], capsys, "does not exist")
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")
    fails(finetune.main, ["--checkpoint", str(tmp_path / "corrupt.pt")], capsys, "corrupt")
    torch.save({"method": "nnclr", "model": {}, "args": {}}, tmp_path / "other.pt")
    fails(finetune.main, ["--checkpoint", str(tmp_path / "other.pt")], capsys, "'nnclr'")
    assert not (tmp_path / "r" / "last.pt").exists()


def test_lars_of_the_official_imagenet_code_by_hand():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, -2.0]))  # 1-D: no decay, no scaling
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5, 0.5])
    pretrain.LARS([w, b], lr=2.0, weight_decay=0.1, eta=0.001).step()
    # g + wd w = [0.9, 1.2], norm 1.5; trust = 0.001 * 5 / 1.5 = 1 / 300; no clipping
    torch.testing.assert_close(w, torch.tensor([[3 - 2 * 0.9 / 300, 4 - 2 * 1.2 / 300]]))
    torch.testing.assert_close(b, torch.tensor([0.0, -3.0]))


def test_cli_error_is_one_line(capsys):
    assert fails(pretrain.main, ["--num-views", "1"], capsys, "--num-views") == \
        "error: argument --num-views: must be at least 2 (got 1) (see --help)"


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    # checked without a host sync per step: the first bad step is read at the epoch's end,
    # before its checkpoint, and named
    flags = [*TINY, "--dev", "32", "--max-epochs", "2", "--eval-every", "0", "--output-dir",
             str(tmp_path), "--log-every", "1000"]
    real_loss = pretrain.mmcr_loss
    calls = []

    def nan_in_second_epoch(z, z_momentum, lmbda, local_gradient):
        loss, logs = real_loss(z, z_momentum, lmbda, local_gradient)
        calls.append(1)
        return (loss * float("nan"), logs) if len(calls) == 6 else (loss, logs)

    monkeypatch.setattr(pretrain, "mmcr_loss", nan_in_second_epoch)
    with pytest.raises(SystemExit) as exit_info:
        run_main(pretrain.main, flags)
    assert exit_info.value.code == 1
    assert "non-finite loss at step 6" in capsys.readouterr().err  # the 6th step
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                      if v.is_floating_point())


def test_short_run_lowers_loss_and_lifts_knn(tmp_path, monkeypatch):
    # the real script and loop with a three-layer CNN in place of the ResNet, so ~80 steps fit
    # in seconds; 10 shape classes, chance = 10%
    use_tiny_cnn(monkeypatch, mmcr_model)
    pretrain.main(["--dataset", "synthetic", "--image-size", "16", "--dev", "512",
                   "--batch-size", "32", "--num-views", "4", "--max-epochs", "5",
                   "--learning-rate", "3e-3", "--num-workers", "0", "--num-neighbours", "10",
                   "--temperature", "0.1", "--eval-every", "5", "--output-dir", str(tmp_path)])
    records = read_metrics(tmp_path)
    assert records[-1]["loss"] < records[1]["loss"] - 1.0
    assert records[-1]["knn_top1"] > records[0]["knn_top1"] + 5.0, records
