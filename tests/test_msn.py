"""MSN tests: the loss against a naive float64 implementation, prototypes that learn, masking,
positional-embedding interpolation, schedules, 2-process equivalence, resume, end to end."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torchvision

from common.checkpoint import load_checkpoint
from msn import finetune, pretrain
from msn.model import MSN, ViT, keep_tokens, msn_loss, resize_pos_embedding, sinkhorn, vit_config
from helpers import fails, read_metrics, run_distributed, straight_and_resumed

TINY = ["--dataset", "synthetic", "--image-size", "16", "--patch-size", "4", "--num-workers",
        "0", "--arch", "vit_tiny", "--depth", "1", "--focal-views", "2", "--hidden-dim", "64",
        "--projection-dim", "32", "--num-prototypes", "16"]


def naive_msn(z, h, prototypes, tau, sharpen, iters, memax_weight):
    """MSN written out with explicit loops in float64, following the official formulation:
    softmax then p ** (1 / T), Sinkhorn row/column loops, CE with target i % B for anchor i."""
    z, h, prototypes = z.double(), h.double(), prototypes.double()
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    z, h, prototypes = unit(z), unit(h), unit(prototypes)
    n, k = h.shape[0], prototypes.shape[0]
    p = torch.exp(z @ prototypes.T / tau)
    p = p / p.sum(1, keepdim=True)
    t = torch.exp(h @ prototypes.T / tau)
    t = t / t.sum(1, keepdim=True)
    t = t ** (1 / sharpen)
    t = t / t.sum(1, keepdim=True)
    q = t.T.clone() / t.sum()  # (K, N)
    for _ in range(iters):
        for j in range(k):
            q[j] = q[j] / q[j].sum() / k
        for i in range(n):
            q[:, i] = q[:, i] / q[:, i].sum() / n
    q = (q * n).T  # (N, K)
    ce = 0.0
    for i in range(z.shape[0]):  # anchors are view-major: anchor i belongs to image i % N
        ce = ce - sum(q[i % n, j] * math.log(p[i, j]) for j in range(k))
    ce = ce / z.shape[0]
    p_mean = p.mean(0)
    memax = sum(float(x) * math.log(float(x)) for x in p_mean) + math.log(k)
    return ce + memax_weight * memax, ce, memax, q, p


def test_loss_matches_naive_implementation():
    torch.manual_seed(0)
    b, views, d, k = 6, 3, 8, 5
    z, h, prototypes = torch.randn(views * b, d), torch.randn(b, d), torch.randn(k, d)
    loss, logs = msn_loss(z, h, prototypes, tau=0.1, sharpen=0.25, sinkhorn_iters=3,
                          memax_weight=0.7)
    ref_loss, ref_ce, ref_memax, q, p = naive_msn(z, h, prototypes, 0.1, 0.25, 3, 0.7)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert float(logs["cross_entropy"]) == pytest.approx(float(ref_ce), rel=1e-5)
    assert float(logs["memax"]) == pytest.approx(ref_memax, rel=1e-4, abs=1e-6)
    assert float(logs["prototypes_used"]) == len(set(q.argmax(1).tolist()))
    assert float(logs["anchor_entropy"]) == pytest.approx(float(-(p * p.log()).sum(1).mean()),
                                                          rel=1e-5)
    # the anchor layout matters: image-major anchors give another loss
    image_major = z.view(views, b, d).transpose(0, 1).reshape(views * b, d)
    assert abs(float(msn_loss(image_major, h, prototypes)[0]) - float(loss)) > 1e-3


def test_sinkhorn_marginals():
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(12, 4) * 3, dim=1)
    out = sinkhorn(q, 3)
    assert torch.allclose(out.sum(1), torch.ones(12), atol=1e-6)  # each target sums to 1
    balanced = sinkhorn(q, 200)  # converged: every prototype receives N / K = 3
    assert torch.allclose(balanced.sum(0), torch.full((4,), 3.0), atol=1e-4)
    assert (balanced.sum(0) - 3).abs().max() < (q.sum(0) - 3).abs().max()


def test_loss_stays_finite_with_underflowing_targets_and_few_images():
    torch.manual_seed(0)
    prototypes = torch.randn(64, 8)
    h = 5 * prototypes[:2]  # N = 2 < K = 64, targets exactly on prototypes
    z = torch.randn(6, 8, requires_grad=True)
    for sharpen in (0.25, 0.05, 0.01):  # 0.05: most target probabilities underflow to 0
        loss, logs = msn_loss(z, h, prototypes, sharpen=sharpen)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), sharpen
        assert all(torch.isfinite(v) for v in logs.values()), sharpen


def tiny_model(image_size=16, depth=1):
    torch.manual_seed(0)
    return MSN(vit_config("vit_tiny", 4, image_size, depth), 32, 16, 8)


def test_prototypes_learn_and_target_gets_no_gradient():
    model = tiny_model()
    args = pretrain.get_args(TINY + ["--clip-grad", "1.0"])
    optimizer = torch.optim.AdamW(pretrain.param_groups(model))
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = pretrain.train_step(model, model, views, optimizer, None, (1e-3, 0.04, 0.9), args)
    assert model.prototypes.grad is not None and model.prototypes.grad.abs().sum() > 0
    assert not torch.equal(model.prototypes, before["prototypes"])
    for name, p in [*model.target_encoder.named_parameters(),
                    *model.target_projector.named_parameters()]:
        assert p.grad is None and not p.requires_grad, name
    # the target moved by the EMA only: theta_t = 0.9 theta_t + 0.1 theta (after the step)
    online = dict(model.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith(("target_encoder.", "target_projector.")):
            fast = online[name.replace("target_", "", 1)]
            assert torch.allclose(p, 0.9 * before[name] + 0.1 * fast, atol=1e-6), name
    assert out["grad_norm"] > 0 and math.isfinite(float(out["loss"]))


def test_masking_keeps_class_token_and_shared_positions():
    x = torch.arange(2 * 64 * 3, dtype=torch.float32).view(2, 64, 3)
    for ratio, kept in ((0.15, 54), (0.25, 48), (0.5, 32)):
        out = keep_tokens(x, ratio)
        assert out.shape == (2, kept, 3)
        idx = (out[..., 0] - x[:, :1, 0]) / 3  # token index of each kept row, per image
        assert torch.equal(idx[0], idx[1]) and len(set(idx[0].tolist())) == kept
    per_image = (keep_tokens(x, 0.5, per_image=True)[..., 0] - x[:, :1, 0]) / 3
    assert not torch.equal(per_image[0], per_image[1])

    vit = ViT(**vit_config("vit_tiny", 4, 16, depth=1))
    images = torch.randn(3, 3, 16, 16)
    full = vit.tokens(images)  # (3, 17, E)
    masked = vit.tokens(images, 0.15)
    assert masked.shape[1] == 1 + math.floor(16 * 0.85)
    assert torch.equal(masked[:, 0], full[:, 0])  # the class token, always first
    found = [[int((full[b, 1:] == row).all(-1).nonzero()) for row in masked[b, 1:]]
             for b in range(3)]
    assert found[0] == found[1] == found[2] and len(set(found[0])) == 13


def test_only_the_anchor_view_is_masked():
    model = tiny_model()
    lengths = {"online": [], "target": []}
    model.encoder.encoder.layers.register_forward_hook(
        lambda m, i, o: lengths["online"].append(i[0].shape[1]))
    model.target_encoder.encoder.layers.register_forward_hook(
        lambda m, i, o: lengths["target"].append(i[0].shape[1]))
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)] + [torch.randn(4, 3, 8, 8)] * 3
    z, h = model(views, 0.25)
    assert z.shape == (4 * 4, 16) and h.shape == (4, 16)
    assert lengths == {"online": [1 + 12, 1 + 4], "target": [1 + 16]}


def test_positional_embedding_interpolation():
    pos = torch.randn(1, 16, 5)
    assert resize_pos_embedding(pos, (4, 4)) is pos  # same grid: untouched
    constant = torch.full((1, 16, 5), 0.3)
    small = resize_pos_embedding(constant, (2, 2))
    assert small.shape == (1, 4, 5) and torch.allclose(small, torch.full_like(small, 0.3))
    vit = ViT(**vit_config("vit_tiny", 4, 16, depth=2)).eval()
    x = torch.randn(2, 3, 16, 16)
    # at the native size the forward is torchvision's (heads = Identity)
    ref = torchvision.models.VisionTransformer.forward(vit, x)
    assert torch.allclose(vit(x), ref, atol=1e-6)
    assert vit(torch.randn(2, 3, 8, 8)).shape == (2, 192)


def test_schedules_start_middle_end():
    args = pretrain.get_args(TINY)  # lr 1e-3 from 2e-4, final 1e-6; wd 0.04 -> 0.4; ema 0.996
    total, warmup = 800, 100  # horizon 1.25 x 800 = 1000 steps
    lr, wd, m = pretrain.schedules(0, total, warmup, args)
    assert lr == pytest.approx(2e-4 + 0.01 * 8e-4) and m == pytest.approx(0.996)
    assert wd == pytest.approx(0.04, abs=1e-5)
    lr, wd, m = pretrain.schedules(99, total, warmup, args)  # warmup ends: the peak
    assert lr == pytest.approx(1e-3)
    lr, wd, m = pretrain.schedules(549, total, warmup, args)  # cosine midpoint: s = 550
    assert lr == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    lr, wd, m = pretrain.schedules(499, total, warmup, args)  # wd midpoint: s = 500 of 1000
    assert wd == pytest.approx(0.22) and m == pytest.approx(0.996 + 499 * 0.004 / 1000)
    lr, wd, m = pretrain.schedules(799, total, warmup, args)  # last step, short of the end
    assert lr == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 7 / 9)),
                               rel=1e-3)
    assert wd == pytest.approx(0.4 - 0.18 * (1 + math.cos(math.pi * 0.8)))
    assert m == pytest.approx(0.999196)


class TinyEncoder(nn.Module):
    """A linear 'encoder' and the prototypes, as in MSN: the prototypes are a parameter of the
    DDP module but used only in the loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.linear = nn.Linear(6, 8)
        self.prototypes = nn.Parameter(torch.randn(5, 8))

    def forward(self, x):
        return self.linear(x)


def global_batch(n=8, views=3):
    g = torch.Generator().manual_seed(3)
    return torch.randn(views, n, 6, generator=g), torch.randn(n, 8, generator=g)


def ddp_loss(rank, world):
    x, h = global_batch()
    b = x.shape[1] // world
    x, h = x[:, rank * b:(rank + 1) * b].flatten(0, 1), h[rank * b:(rank + 1) * b]
    model = TinyEncoder()
    net = nn.parallel.DistributedDataParallel(model)
    loss, logs = msn_loss(net(x), h, model.prototypes, memax_weight=0.5)
    loss.backward()  # DDP averages every gradient, the prototypes' included
    return loss.detach(), logs, {k: p.grad for k, p in model.named_parameters()}


def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    x, h = global_batch()
    model = TinyEncoder()
    loss, logs = msn_loss(model(x.flatten(0, 1)), h, model.prototypes, memax_weight=0.5)
    loss.backward()
    results = run_distributed(ddp_loss, 2, tmp_path)
    # the cross-entropy is a local mean: the global loss is the mean of the ranks' losses;
    # ME-MAX, Sinkhorn targets and the prototype count span the global batch on every rank
    assert float(sum(r[0] for r in results) / 2) == pytest.approx(loss.item(), rel=1e-5)
    for rank_loss, rank_logs, grads in results:
        assert float(rank_logs["memax"]) == pytest.approx(float(logs["memax"]), rel=1e-5)
        assert rank_logs["prototypes_used"] == logs["prototypes_used"]
        for name, p in model.named_parameters():
            assert torch.allclose(grads[name], p.grad, atol=1e-6), name


def test_bad_input_exits_with_one_line(capsys):
    fails(pretrain.main, TINY + ["--mask-ratio", "1.0"], capsys, "--mask-ratio")
    for flags in (["--image-size", "18"], ["--focal-views", "-1"], ["--focal-size", "10"],
                  ["--rand-scale", "0.5", "0.2"], ["--batch-size", "1"], ["--depth", "0"],
                  ["--patch-size", "-4"], ["--tau", "0"]):
        with pytest.raises(SystemExit) as e:
            pretrain.get_args(TINY + flags)
        assert e.value.code == 2, flags


def test_resume_equals_straight_run(tmp_path, monkeypatch):
    flags = TINY + ["--dev", "32", "--batch-size", "8", "--max-epochs", "2", "--eval-every",
                    "0", "--hidden-dim", "32", "--num-prototypes", "8"]
    # 4 steps per epoch: SIGTERM, then a kill, at random steps
    a, b, stops = straight_and_resumed(pretrain, flags, tmp_path, monkeypatch)
    assert a["step"] == b["step"] == 8
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:  # online and target encoders, projectors (BN stats), prototypes
        assert torch.equal(a["model"][k], b["model"][k]), (k, stops)
    for ga, gb in zip(a["optimizer"]["param_groups"], b["optimizer"]["param_groups"]):
        assert (ga["lr"], ga["weight_decay"]) == (gb["lr"], gb["weight_decay"])  # schedules
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrain_then_finetune_end_to_end(tmp_path):
    out = tmp_path / "run"
    pretrain.main(TINY + ["--dev", "64", "--batch-size", "8", "--max-epochs", "3",
                          "--eval-every", "3", "--output-dir", str(out)])
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3] and "knn_top1" in records[3]
    assert {"cross_entropy", "memax", "prototypes_used", "target_entropy", "anchor_entropy",
            "grad_norm", "lr", "weight_decay", "ema"} <= set(records[1])
    # a short run lowers the loss without collapsing onto one prototype
    assert records[3]["loss"] < 0.9 * records[1]["loss"], [r.get("loss") for r in records]
    assert records[3]["prototypes_used"] > 4
    # backbone.pt is the target ViT: it loads into torchvision's class from args.json alone
    config = json.loads((out / "args.json").read_text())["vit_config"]
    vit = torchvision.models.VisionTransformer(**config)
    result = vit.load_state_dict(torch.load(out / "backbone.pt", weights_only=True),
                                 strict=False)
    assert result.missing_keys == ["heads.head.weight", "heads.head.bias"]
    assert not result.unexpected_keys
    vit.heads = nn.Identity()
    model = MSN(config, 64, 32, 16)
    model.load_state_dict(load_checkpoint(out / "last.pt", "msn")["model"])
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(vit.eval()(x), model.target_encoder.eval()(x), atol=1e-5)
    record = finetune.main(["--checkpoint", str(out / "last.pt"), "--dev", "64",
                            "--batch-size", "16", "--max-epochs", "1", "--num-workers", "0"])
    assert 0 <= record["top1"] <= 100 and "top5" in record
    assert (out / "finetune-linear" / "last.pt").is_file()


def test_short_run_lowers_the_loss_and_lifts_knn(tmp_path):
    # 512 steps of a one-block ViT-Tiny/4 at 16 px, about 50 s. Short-run settings, not the
    # official ones: the 0.996 -> 1 target EMA would leave the evaluated target encoder near
    # its initial weights; the official crop scales leave a few pixels of shape at 16 px; and
    # at lr 1e-3 the first few hundred steps lose the random ViT's features (kNN dips) before
    # they improve. Seeds 1, 2, 3, 4, 42 gave kNN +6.3, +2.3, +4.7, +7.8, +5.5 points on one
    # thread; this test (seed 42, two threads) +3.9.
    pretrain.main(TINY + ["--dev", "1024", "--batch-size", "32", "--max-epochs", "16",
                          "--hidden-dim", "128", "--learning-rate", "5e-4", "--ema-start", "0.9",
                          "--rand-scale", "0.6", "1", "--focal-scale", "0.3", "0.6",
                          "--num-neighbours", "10", "--eval-every", "16",
                          "--output-dir", str(tmp_path)])
    records = read_metrics(tmp_path)
    first, last = records[1], records[-1]
    assert last["cross_entropy"] < first["cross_entropy"] - 0.2, records
    assert last["prototypes_used"] > 12  # of 16: ME-MAX keeps the targets spread
    assert last["knn_top1"] > records[0]["knn_top1"] + 2.0, records  # 10 classes, 256 test images
