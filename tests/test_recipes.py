"""--recipe: the defaults follow the data. Expected values are typed in from the official
sources (cited per method), not read from the code under test."""
import pytest
from PIL import Image

from common.augment import eval_resize
from densecl import pretrain as densecl
from helpers import read_metrics, resolved, use_tiny_cnn
from mmcr import pretrain as mmcr
from msn import pretrain as msn
from nnclr import model as nnclr_model
from nnclr import pretrain as nnclr

CIFAR10 = ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
METHODS = [mmcr, nnclr, densecl, msn]


def _folder(root, size):
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        Image.new("RGB", (size, size + 10)).save(root / split / "a" / "0.png")
    return str(root)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("cifar_like"), 32)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("imagenet_like"), 375)


def blur_probabilities(views):
    """Per view, the probability of its Gaussian blur (0 when it has none)."""
    return [view.blur_p for view in views]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__.split(".")[0])
def test_a_32px_folder_gets_the_cifar_views_normalisation_and_stem(method, small):
    args = method.get_args(["--dataset", "imagefolder", "--data-dir", small])
    assert args.recipe == "cifar" and args.image_size == 32
    assert (args.mean, args.std) == CIFAR10
    assert getattr(args, "stem", "cifar") == "cifar" and getattr(args, "patch_size", 4) == 4
    views = method.pretrain_views(args)
    assert views[0].size == 32 and set(blur_probabilities(views)) == {0.0}
    assert eval_resize(args)[0] == 32  # 32 px images are used as they are


@pytest.mark.parametrize("method, expected, blur", [
    # ThomasYerxa/mmcr fafd3a9 pretrain_imagenet.py (n_aug 2, lr 0.6, batch 2048 on 16 GPUs,
    # tau 0.99), mmcr/imagenet/train.py, models.py: ResNet-50 (zero-init residuals), LARS
    # (Barlow Twins form, eta 0.001) lr x batch / 256, wd 1e-6, 100 epochs, 10 warmup, cosine
    # to 0.001 x peak, projector 8192-8192-512
    (mmcr, dict(backbone="resnet50", num_views=2, optimizer="lars", base_learning_rate=0.6,
                lars_eta=0.001, weight_decay=1e-6, max_epochs=100, warmup_duration=0.1,
                final_lr_ratio=0.001, ema=0.99, hidden_dim=[8192, 8192],
                projection_dim=512, zero_init_residual=True, batch_size=128,
                local_gradient=True), [1.0, 0.1]),
    # vturrisi/solo-learn 9187ea3 scripts/pretrain/imagenet-100/nnclr.yaml: ResNet-18, 64 per
    # GPU (2 GPUs), LARS lr 0.4 x batch / 256 (eta 0.02), wd 1e-5, 400 epochs, 10 warmup,
    # temperature 0.2, queue 65536; imagenet-100/augmentations/asymmetric.yaml blur 1.0 / 0.1
    (nnclr, dict(backbone="resnet18", batch_size=64, base_learning_rate=0.4, lars_eta=0.02,
                 weight_decay=1e-5, max_epochs=400, warmup_duration=10 / 400, tau=0.2,
                 queue_size=65536), [1.0, 0.1]),
    # densecl configs/selfsup/densecl/densecl_imagenet_200ep.py: ResNet-50, SGD 0.03 per 256
    # images, wd 1e-4, EMA 0.999, queue 65536, 200 epochs, blur p 0.5
    (densecl, dict(backbone="resnet50", base_learning_rate=0.03, weight_decay=1e-4, ema=0.999,
                   queue_size=65536, max_epochs=200, warmup_duration=0.0, batch_size=32),
     [0.5, 0.5]),
    # msn configs/pretrain/msn_vits16.yaml: ViT-S/16, 96 px focal views, AdamW 1e-3, wd 0.04
    # -> 0.4, EMA 0.996, 800 epochs, 15 warmup, 64 images per GPU, blur p 0.5
    (msn, dict(arch="vit_small", patch_size=16, focal_size=96, learning_rate=1e-3,
               weight_decay=0.04, final_weight_decay=0.4, ema_start=0.996, max_epochs=800,
               warmup_duration=15 / 800, batch_size=64), [0.5] * 12),
], ids=["mmcr", "nnclr", "densecl", "msn"])
def test_an_imagenet_size_folder_gets_the_official_imagenet_values(method, expected, blur,
                                                                    large):
    args = method.get_args(["--dataset", "imagefolder", "--data-dir", large])
    assert args.recipe == "imagenet" and args.image_size == 224
    assert (args.mean, args.std) == IMAGENET
    assert getattr(args, "stem", "imagenet") == "imagenet"
    assert {k: getattr(args, k) for k in expected} == expected
    assert blur_probabilities(method.pretrain_views(args)) == blur
    assert eval_resize(args) == (256, "bilinear")


@pytest.mark.parametrize("method, expected, view", [
    # bartoszzuk/mmcr 5eb4c13 pretrain.py: ResNet-18, 64 images x 16 views, Adam 1e-3, wd 1e-6,
    # 10% warmup, cosine to 0, 500 epochs; ThomasYerxa/mmcr fafd3a9 mmcr/cifar_stl/train.py
    # projector 512-128, no momentum branch; mmcr/cifar_stl/data.py views
    (mmcr, dict(backbone="resnet18", batch_size=64, num_views=16, optimizer="adam",
                learning_rate=1e-3, weight_decay=1e-6, warmup_duration=0.1, final_lr_ratio=0.0,
                max_epochs=500, hidden_dim=[512], projection_dim=128, ema=None, lmbda=0.0,
                zero_init_residual=False, num_neighbours=200, temperature=0.5,
                local_gradient=False),
     dict(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.0,
          solarize_p=0.0, interpolation="bilinear")),
    # vturrisi/solo-learn 9187ea3 scripts/pretrain/cifar/nnclr.yaml, asymmetric.yaml: ResNet-18,
    # batch 256, LARS lr 0.4 x batch / 256 (eta 0.02), wd 1e-5, 10 warmup epochs of 1000,
    # temperature 0.2, queue 65536, projector 2048-256, predictor 4096; views bicubic, jitter
    # (0.4, 0.4, 0.2, 0.1), solarisation 0 / 0.2, no blur
    (nnclr, dict(backbone="resnet18", batch_size=256, base_learning_rate=0.4, learning_rate=0.4,
                 lars_eta=0.02, weight_decay=1e-5, warmup_duration=0.01, max_epochs=1000,
                 tau=0.2, queue_size=65536, hidden_dim=2048, projection_dim=256,
                 pred_hidden_dim=4096),
     dict(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.0,
          solarize_p=0.0, interpolation="bicubic")),
    # lightly-ai/lightly e8d317f cifar10_benchmark.py (MoCo): ResNet-18, batch 128, SGD 0.06 x
    # batch / 128, wd 5e-4, momentum 0.99, memory bank 4096, 200 epochs; WXinlong/DenseCL
    # b64bbb6 densecl_imagenet_200ep.py: temperature 0.2, loss_lambda 0.5, crop scale 0.2-1
    (densecl, dict(backbone="resnet18", batch_size=128, base_learning_rate=0.12,
                   learning_rate=0.06, weight_decay=5e-4, ema=0.99, queue_size=4096,
                   max_epochs=200, warmup_duration=0.0, tau=0.2, dense_weight=0.5),
     dict(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.0,
          interpolation="bilinear")),
    # facebookresearch/msn 4388dc1 configs/pretrain/msn_vits16.yaml: ViT-S, AdamW 1e-3 after 15
    # warmup epochs from 2e-4, final 1e-6, wd 0.04 -> 0.4, EMA 0.996, 800 epochs, 1024
    # prototypes, temperature 0.1, sharpening 0.25, ME-MAX 1, mask 0.15, 10 focal views, clip 3
    (msn, dict(arch="vit_small", learning_rate=1e-3, start_lr_ratio=2e-4 / 1e-3,
               final_lr_ratio=1e-6 / 1e-3, weight_decay=0.04, final_weight_decay=0.4,
               ema_start=0.996, max_epochs=800,
               warmup_duration=15 / 800, num_prototypes=1024, tau=0.1, sharpen=0.25,
               memax_weight=1.0, mask_ratio=0.15, focal_views=10, clip_grad=3.0),
     dict(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.0)),
], ids=["mmcr", "nnclr", "densecl", "msn"])
def test_the_cifar_recipe_has_the_values_of_its_sources(method, expected, view):
    args = method.get_args(["--dataset", "cifar10"])
    assert args.recipe == "cifar"
    assert resolved(args, expected), {k: getattr(args, k) for k in expected}
    first = method.pretrain_views(args)[0]
    assert {k: getattr(first, k) for k in view} == view


def test_the_stl10_recipe_has_the_official_mmcr_views():
    # ThomasYerxa/mmcr fafd3a9 mmcr/cifar_stl/data.py StlBatchTransform: colour jitter and
    # grayscale 0.1 before a bicubic crop of scale 0.2-1 to 64 px; eval: resize 70 bicubic
    args = mmcr.get_args(["--dataset", "stl10"])
    views = mmcr.pretrain_views(args)
    assert len(views) == 16 and set(views) == {views[0]}
    assert (views[0].size, views[0].scale, views[0].gray_p, views[0].colour_first,
            views[0].interpolation) == (64, (0.2, 1.0), 0.1, True, "bicubic")
    assert eval_resize(args) == (70, "bicubic")


def test_explicit_flags_win(large):
    args = mmcr.get_args(["--dataset", "imagefolder", "--data-dir", large, "--num-views", "4",
                          "--learning-rate", "0.1", "--mean", "0.1", "0.2", "0.3"])
    assert args.recipe == "imagenet" and args.optimizer == "lars"
    assert (args.num_views, args.learning_rate, args.mean) == (4, 0.1, [0.1, 0.2, 0.3])
    assert args.std == IMAGENET[1]
    assert args.explicit == ["data_dir", "dataset", "learning_rate", "mean", "num_views"]
    args = mmcr.get_args(["--dataset", "imagefolder", "--data-dir", large, "--recipe", "cifar"])
    assert (args.image_size, args.optimizer, args.stem, args.mean) == (32, "adam", "cifar",
                                                                       CIFAR10[0])
    args = mmcr.get_args(["--dataset", "imagefolder", "--data-dir", large, "--image-size", "64"])
    assert args.recipe == "stl10" and args.image_size == 64
    args = mmcr.get_args(["--dataset", "synthetic", "--base-learning-rate", "1.0"])
    assert args.learning_rate == 1.0 * 64 / 256 and args.base_learning_rate == 1.0


def test_warmup_in_epochs_follows_the_run_length(capsys):
    # solo-learn warms up for 10 epochs whatever the run length; MSN for 15
    assert nnclr.get_args(["--dataset", "synthetic", "--max-epochs", "100"]).warmup_duration \
        == pytest.approx(0.1)
    assert msn.get_args(["--dataset", "synthetic", "--max-epochs", "300"]).warmup_duration \
        == pytest.approx(0.05)
    assert "warmup" not in capsys.readouterr().out
    assert nnclr.get_args(["--dataset", "synthetic", "--max-epochs", "100",
                           "--warmup-duration", "0.3"]).warmup_duration == 0.3


@pytest.mark.parametrize("method, recipe_epochs", [(nnclr, 10), (msn, 15)])
def test_a_recipe_warmup_takes_at_most_a_tenth_of_a_short_run(method, recipe_epochs, capsys):
    args = method.get_args(["--dataset", "synthetic", "--max-epochs", "10"])
    assert args.warmup_duration == pytest.approx(0.1)  # 1 of 10 epochs, not all of them
    out = capsys.readouterr().out
    assert f"--warmup-duration of {recipe_epochs} epochs is {recipe_epochs * 10}% of " \
           "--max-epochs 10: using a tenth of the run" in out
    given = method.get_args(["--dataset", "synthetic", "--max-epochs", "10",
                             "--warmup-duration", "0.5"])
    assert given.warmup_duration == 0.5 and "warmup" not in capsys.readouterr().out


def test_support_set_larger_than_the_data_is_shrunk(tmp_path, monkeypatch, capsys):
    use_tiny_cnn(monkeypatch, nnclr_model)
    nnclr.main(["--dataset", "synthetic", "--image-size", "16", "--dev", "40", "--batch-size",
                "8", "--num-workers", "0", "--max-epochs", "1", "--hidden-dim", "32",
                "--projection-dim", "16", "--pred-hidden-dim", "32", "--eval-every", "0",
                "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "recipe cifar (synthetic, 16 px" in out
    assert "notice: --queue-size 65536 would hold random vectors for more than 5 steps (a " \
           "tenth of the run, at least an epoch): using 40" in out
    assert read_metrics(tmp_path)[-1]["step"] == 5
    assert '"queue_size": 40' in (tmp_path / "args.json").read_text()


def test_support_set_is_solo_learns_on_a_full_cifar_run_and_fits_a_short_one(capsys):
    # CIFAR-10 at batch 256: 195 steps per epoch; 65,536 is replaced in 256 steps
    assert nnclr.get_args(["--dataset", "cifar10"]).queue_size == 65536
    assert nnclr.get_args(["--dataset", "cifar10", "--max-epochs", "20"]).queue_size == 65536
    assert "queue-size" not in capsys.readouterr().out
    # 10 epochs: a tenth of the run is one epoch, 195 steps x 256 images
    assert nnclr.get_args(["--dataset", "cifar10", "--max-epochs", "10"]).queue_size == 49920
    assert "using 49920" in capsys.readouterr().out
