"""The device views (common/device_views.py, common/crops.py) against the PIL views
(tests/pil_views.py) and torchvision: the drawn parameters follow the same distributions (two-
sample Kolmogorov-Smirnov distances over many draws), and each deterministic op matches
torchvision's functional result."""
import math

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from common import loaders
from common import crops
from common import device_views as dv
from common.augment import View
from pil_views import MultiView
from view_pairs import ks_distance, ks_limit

MEAN, STD = (0.0,) * 3, (1.0,) * 3


@pytest.mark.parametrize("height, width, scale", [(32, 32, (0.08, 1.0)), (24, 40, (0.2, 1.0)),
                                                  (96, 20, (0.3, 1.0))])
def test_crop_parameters_follow_torchvision(height, width, scale):
    torch.manual_seed(0)
    n = 6000
    ours = torch.stack(crops.crop_params(torch.tensor([[height, width]] * n), scale), 1)
    img = torch.zeros(3, height, width)
    ref = torch.tensor([T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3))
                        for _ in range(n)], dtype=torch.float32)  # (top, left, h, w)
    for k, name in enumerate(["top", "left", "height", "width"]):
        assert ks_distance(ours[:, k], ref[:, k]) < ks_limit(n, n), name
    area = lambda c: c[:, 2] * c[:, 3] / (height * width)  # noqa: E731
    assert ks_distance(area(ours), area(ref)) < ks_limit(n, n)
    assert ((ours[:, 0] + ours[:, 2] <= height) & (ours[:, 1] + ours[:, 3] <= width)).all()


def _views(view, images):
    """(views, boxes) of one View of float images in [0, 1]."""
    sizes = torch.tensor([images.shape[-2:]] * images.shape[0])
    u8 = (images * 255).round().to(torch.uint8)
    return dv.BatchViews([view])((u8, sizes, torch.zeros(len(u8))))[:2]


def test_flip_and_grayscale_rates_and_jitter_probability():
    torch.manual_seed(0)
    n = 4000
    img = torch.rand(1, 3, 8, 8).expand(n, 3, 8, 8)
    view = View(8, MEAN, STD, scale=(1.0, 1.0), jitter_p=0.0, gray_p=0.2)
    (out,), boxes = _views(view, img)
    flips, grays = boxes[:, 0, 4], (out[:, 0] == out[:, 1]).all((1, 2)).float()
    for rate, p in ((flips.mean(), 0.5), (grays.mean(), 0.2)):  # 4 standard errors
        assert abs(float(rate) - p) < 4 * math.sqrt(p * (1 - p) / n)
    bright = View(8, MEAN, STD, scale=(1.0, 1.0), jitter=(0.4, 0, 0, 0), gray_p=0.0)
    (out,), _ = _views(bright, torch.full((n, 3, 8, 8), 0.5))
    factor = out.mean((1, 2, 3)) / (128 / 255)  # brightness factor, 1 where not applied
    applied = (factor - 1).abs() > 1e-3
    assert abs(float(applied.float().mean()) - 0.8) < 4 * math.sqrt(0.16 / n)
    uniform = torch.rand(int(applied.sum())) * 0.8 + 0.6  # ColorJitter: U(0.6, 1.4)
    assert ks_distance(factor[applied], uniform) < ks_limit(len(uniform), len(uniform))


def test_views_made_together_keep_their_own_probabilities():
    # NNCLR's two views differ only in solarisation: one batch of 2B, each keeps its chances
    torch.manual_seed(0)
    plain = View(8, MEAN, STD, scale=(1.0, 1.0), jitter_p=0.0, gray_p=0.0)
    dark = View(8, MEAN, STD, scale=(1.0, 1.0), jitter_p=0.0, gray_p=1.0, solarize_p=1.0)
    make = dv.BatchViews([plain, dark, plain])
    assert len(make.groups) == 1
    images = (torch.rand(64, 3, 8, 8) * 255).to(torch.uint8)
    (first, second, third), _, _ = make((images, torch.tensor([[8, 8]] * 64),
                                          torch.zeros(64)))
    for out in (first, third):  # never grayscale
        assert ((out[:, 0] - out[:, 1]).abs().amax((1, 2)) > 0.01).all()
    assert (second[:, 0] == second[:, 1]).all() and (second[:, 1] == second[:, 2]).all()
    assert float(second.max()) < 128 / 255 < float(first.max())  # every bright pixel inverted


def test_jitter_orders_are_uniform_permutations():
    torch.manual_seed(0)
    n = 4800
    applied, factors, order = dv.jitter_params(n, (0.4, 0.4, 0.4, 0.1), p=0.8)
    assert (order.sort(1).values == torch.arange(4)).all()  # each op once per image
    counts = torch.bincount(order @ torch.tensor([64, 16, 4, 1]), minlength=256)
    assert (counts > 0).sum() == 24 and counts.max() < 1.5 * n / 24  # all 24 orders, about even
    assert abs(float(applied.float().mean()) - 0.8) < 4 * math.sqrt(0.16 / n)


def test_jitter_equals_torchvision_ops_in_the_drawn_order(monkeypatch):
    # a naive loop of torchvision's functional ops over the same draws, image by image
    torch.manual_seed(0)
    x = torch.rand(64, 3, 6, 5)
    x[:8, 1] = x[:8, 0]  # ties between channels: the hue sector falls back as torchvision's
    x[8:12] = 0.5  # gray pixels: no hue
    params = dv.jitter_params(64, (0.4, 0.4, 0.4, 0.1), p=0.8)
    monkeypatch.setattr(dv, "jitter_params", lambda n, strength, p: params)
    view = View(5, MEAN, STD, gray_p=0.0)
    ours = dv.colour(x.clone(), *dv.draw([view], torch.tensor([[6, 5]] * 64), x.device))
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i, (applied, factors, order) in enumerate(zip(*params)):
        expected = x[i]
        for op in order.tolist() if applied else []:
            expected = fns[op](expected, float(factors[op]))
        torch.testing.assert_close(ours[i], expected, atol=2e-6, rtol=0)


def test_contrast_of_a_padded_image_takes_the_mean_of_its_own_pixels():
    torch.manual_seed(0)
    img = torch.rand(3, 5, 7)
    padded, valid = torch.zeros(1, 3, 8, 9), torch.zeros(1, 1, 8, 9)
    padded[0, :, :5, :7], valid[0, :, :5, :7] = img, 1
    f = torch.tensor([0.6])
    out = dv.blend(padded, f, torch.zeros(1), 1 - f, valid)  # contrast 0.6
    torch.testing.assert_close(out[0, :, :5, :7], TF.adjust_contrast(img, 0.6), atol=1e-6, rtol=0)


def test_hue_and_blur_match_torchvision():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    h = torch.tensor([-0.5, -0.03, 0.02, 0.5])[:, None, None, None]
    expected = torch.stack([TF.adjust_hue(x[i], float(h[i])) for i in range(4)])
    torch.testing.assert_close(dv.shift_hue(x, h), expected, atol=2e-6, rtol=0)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")  # PIL's edges
    expected = torch.stack([TF.gaussian_blur(padded[i], [5, 5], [float(sigma[i])] * 2)
                            for i in range(4)])[..., 2:-2, 2:-2]
    torch.testing.assert_close(dv.gaussian_blur(x, sigma, 5), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(dv.gaussian_blur(x, torch.zeros(4)), x)  # sigma 0: no blur


@pytest.mark.parametrize("size", [96, 224])
def test_blur_matches_pils_at_every_view_size(size):
    # the official views blur with PIL (radius = sigma, no size limit): at the widest sigma,
    # 2, the kernel must reach +-3 sigma at every size (the 9 taps that 10% of a 96 px view gave
    # cut it at +-2 sigma: 0.83 levels off PIL on average, 3.9 at most); PIL's box
    # approximation of the Gaussian itself is some levels off (at most 4.7 for sigma 0.5)
    from PIL import ImageFilter
    torch.manual_seed(0)
    img = (torch.rand(3, size, size) * 255).round().byte()
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    for sigma, mean_gap, max_gap in ((2.0, 0.6, 3.0), (1.0, 0.8, 3.5), (0.5, 1.0, 5.0)):
        ref = TF.pil_to_tensor(pil.filter(ImageFilter.GaussianBlur(sigma))).float()
        ours = dv.gaussian_blur(img.float()[None] / 255, torch.tensor([sigma]))[0] * 255
        gap = (ours - ref).abs()[:, 6:-6, 6:-6]  # PIL's box passes treat the edges otherwise
        assert float(gap.mean()) < mean_gap and float(gap.max()) < max_gap, (sigma, gap.max())


@pytest.mark.parametrize("box, size, mode", [
    ((3, 5, 20, 14), 32, "bilinear"),  # a small crop, enlarged
    ((3, 5, 20, 14), 32, "bicubic"),
    ((0, 0, 64, 64), 32, "bilinear"),  # halved: the antialias filter is twice as wide
    ((7, 2, 50, 41), 24, "bicubic"),
])
def test_crop_flip_grayscale_match_torchvision_and_pil(box, size, mode):
    torch.manual_seed(0)
    img = TF.gaussian_blur(torch.rand(3, 64, 64), [7, 7], [2.0, 2.0])  # smooth content
    top, left, h, w = (torch.tensor([float(v)]) for v in box)
    ours = crops.resized_crop(img[None], top, left, h, w, torch.tensor([1.0]), size, mode)[0]
    ours = dv.gray(ours[None])[0].expand(3, -1, -1)
    interpolation = T.InterpolationMode(mode)
    ref = TF.resized_crop(img, *box, [size, size], interpolation, antialias=True)
    ref = TF.rgb_to_grayscale(TF.hflip(ref), num_output_channels=3)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)  # the same filter weights
    # PIL rounds its fixed-point weights and rounds to uint8 between its passes
    pil = Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy())
    u8 = TF.pil_to_tensor(TF.resized_crop(pil, *box, [size, size], interpolation)).float()
    ours = crops.resized_crop((img * 255).round()[None] / 255, top, left, h, w,
                           torch.tensor([0.0]), size, mode)[0]
    gap = (ours * 255 - u8).abs()  # in uint8 steps
    assert float(gap.max()) <= 1.5 and float(gap.mean()) <= 0.5


def test_solarisation_matches_pil():
    img = Image.fromarray((torch.arange(256).reshape(16, 16).byte()[..., None]
                           .expand(16, 16, 3)).numpy())
    ref = TF.pil_to_tensor(TF.solarize(img, 128)).float() / 255
    x = TF.pil_to_tensor(img).float()[None] / 255
    torch.testing.assert_close(dv.solarize(x)[0], ref)


def test_boxes_locate_the_crop_and_views_follow_the_pil_pipeline():
    # a horizontal ramp: the left and right edge values of a view are the ramp at the box edges
    torch.manual_seed(1)
    ramp = torch.linspace(0, 1, 64).expand(8, 3, 64, 64)
    view = View(32, MEAN, STD, jitter_p=0.0, gray_p=0.0)
    (out,), boxes = _views(view, ramp)
    top, left, h, w, flipped = boxes[:, 0].T
    seen = torch.where(flipped.bool()[:, None], out[:, 0, 16, [-1, 0]], out[:, 0, 16, [0, -1]])
    torch.testing.assert_close(seen, torch.stack([left, left + w], 1), atol=0.05, rtol=0)
    pil = MultiView([view] * 2)(Image.fromarray((ramp[0].permute(1, 2, 0) * 255).byte().numpy()))
    assert [v.shape for v in pil] == [out.shape[1:]] * 2 and out.dtype == pil[0].dtype


class ArrayDataset(torch.utils.data.Dataset):
    """Stands in for torchvision's CIFAR-10 (N x H x W x 3 array, `targets` list) or STL-10
    (N x 3 x H x W, `labels` array): a PIL image per item, then the loader's decode."""

    def __init__(self, channels_last: bool):
        torch.manual_seed(0)
        images = (torch.rand(40, 7, 6, 3) * 255).byte()
        self.data = (images if channels_last else images.permute(0, 3, 1, 2)).numpy()
        if channels_last:
            self.targets = list(range(40))
        else:
            self.labels = torch.arange(40).numpy() - 1  # -1: unlabelled

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        image = self.data[i] if hasattr(self, "targets") else self.data[i].transpose(1, 2, 0)
        label = self.targets[i] if hasattr(self, "targets") else int(self.labels[i])
        return TF.pil_to_tensor(Image.fromarray(image)), label


@pytest.mark.parametrize("channels_last", [True, False])
def test_array_datasets_give_the_batches_of_the_per_image_path(channels_last):
    ds = torch.utils.data.Subset(ArrayDataset(channels_last), range(32))  # as --dev 32
    order = torch.randperm(32).tolist()
    fast = torch.utils.data.DataLoader(loaders.array_images(ds), 8, sampler=order,
                                       collate_fn=loaders.ArrayImages.collate)
    slow = torch.utils.data.DataLoader(ds, 8, sampler=order, collate_fn=loaders.collate_images)
    batches = list(zip(fast, slow))
    assert len(batches) == 4
    for ours, reference in batches:  # images (8, 3, 7, 6), sizes (8, 2), labels (8,)
        assert all(torch.equal(a, b) for a, b in zip(ours, reference))
    assert loaders.array_images(torch.utils.data.TensorDataset(torch.zeros(4))) is None  # no array


def test_padded_images_of_different_sizes():
    images = [(torch.rand(3, 20, 30) * 255).byte(), (torch.rand(3, 40, 10) * 255).byte()]
    batch, sizes, labels = loaders.collate_images([(images[0], 0), (images[1], 1)])
    assert batch.shape == (2, 3, 40, 30) and sizes.tolist() == [[20, 30], [40, 10]]
    assert torch.equal(batch[1, :, :40, :10], images[1]) and batch[1, :, :, 10:].sum() == 0
    torch.manual_seed(0)
    view = View(8, MEAN, STD, scale=(1.0, 1.0), jitter_p=0.0, gray_p=0.0)
    (out,), boxes, _ = dv.BatchViews([view])((batch, sizes, labels))
    # a 40 x 10 image has no full-area crop of ratio 3/4..4/3: the fallback stays inside it
    assert (boxes[:, 0, 0] + boxes[:, 0, 2] <= 1 + 1e-6).all()
    assert (boxes[:, 0, 1] + boxes[:, 0, 3] <= 1 + 1e-6).all()
    assert out[1].abs().sum() > 0 and out.shape == (2, 3, 8, 8)


def test_colour_before_the_crop_acts_on_each_whole_image(monkeypatch):
    # colour_first (MMCR's STL-10 views): the colour ops see the whole image, padding left out
    # (contrast blends towards the mean of the image's own pixels), then the crop is resized
    torch.manual_seed(0)
    images = [(torch.rand(3, 20, 30) * 255).byte(), (torch.rand(3, 36, 12) * 255).byte()]
    batch = loaders.collate_images([(img, 0) for img in images])
    monkeypatch.setattr(dv, "jitter_params", lambda n, strength, p: (  # contrast 0.5, then no-ops
        torch.ones(n, dtype=torch.bool), torch.tensor([1.0, 0.5, 1.0, 0.0]).expand(n, 4),
        torch.tensor([1, 0, 2, 3]).expand(n, 4)))
    view = View(12, MEAN, STD, jitter_p=1.0, gray_p=0.0, solarize_p=1.0, colour_first=True)
    views, boxes, _ = dv.BatchViews([view, view])(batch)
    for j, out in enumerate(views):
        for i, img in enumerate(images):
            x = img.float()[None] / 255
            h, w = img.shape[1:]
            box = (boxes[i, j, :4] * torch.tensor([h, w, h, w])).round()[:, None]
            flip = boxes[i, j, 4:]
            crop = lambda y: crops.resized_crop(y, *box, flip, 12)  # noqa: E731
            expected = crop(dv.solarize(TF.adjust_contrast(x, 0.5)))
            torch.testing.assert_close(out[i:i + 1], expected, atol=2e-6, rtol=0)
            after = dv.solarize(TF.adjust_contrast(crop(x), 0.5))  # colour after the crop
            assert float((after - expected).abs().max()) > 0.05
