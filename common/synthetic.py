"""A synthetic labelled image dataset generated in-process: offline smoke runs and tests.

Ten shape classes (disk, square, triangle, cross, ring, diamond, horizontal stripes, vertical
stripes, checkerboard, two dots) drawn at a random position and scale, dark on light or light
on dark, plus pixel noise. Position, scale and tone carry no label information, so a network
has to learn shape, for the labels and for telling images apart in a self-supervised loss.
Two tones rather than a palette of colours: colour survives the views' jitter, so an untrained
network sorts the images by colour and DenseCL and MSN then spend their first thousand steps
on it, with no kNN gain a CPU test can wait for (README, "Shared parts").
Image i of a split is a pure function of (seed, i).
"""
import torch
import torchvision.transforms.functional as F

NUM_CLASSES = 10
TONES = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.9, 0.85]])  # dark, light (RGB)


def _shape_mask(label: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean (H, W) mask of class `label` in shape coordinates u, v (unit radius)."""
    box, rad = torch.maximum(u.abs(), v.abs()), (u ** 2 + v ** 2).sqrt()
    pi = torch.pi
    masks = [
        lambda: rad < 1,
        lambda: box < 0.8,
        lambda: (v.abs() < 0.8) & (u.abs() < (v + 0.8) * 0.6),
        lambda: ((u.abs() < 0.3) & (v.abs() < 1)) | ((v.abs() < 0.3) & (u.abs() < 1)),
        lambda: (rad > 0.55) & (rad < 1),
        lambda: u.abs() + v.abs() < 1,
        lambda: (box < 1) & (torch.sin(v * 2.5 * pi) > 0),
        lambda: (box < 1) & (torch.sin(u * 2.5 * pi) > 0),
        lambda: (box < 1) & (torch.sin(u * 2 * pi) * torch.sin(v * 2 * pi) > 0),
        lambda: ((u - 0.5) ** 2 + v ** 2 < 0.16) | ((u + 0.5) ** 2 + v ** 2 < 0.16),
    ]
    return masks[label]()


def render(label: int, size: int, g: torch.Generator) -> torch.Tensor:
    """One uint8 image (3, size, size) of class `label`."""
    axis = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    # large shapes (radius 0.55-0.85 of the half-width) so most random crops still show part
    # of the shape rather than background alone
    cx, cy = (torch.rand(2, generator=g) * 0.4 - 0.2).tolist()
    r = 0.55 + 0.3 * float(torch.rand(1, generator=g))
    mask = _shape_mask(label, (x - cx) / r, (y - cy) / r)
    bg, fg = TONES[torch.randperm(2, generator=g)]  # dark on light or light on dark
    img = torch.where(mask, fg[:, None, None], bg[:, None, None])
    img = img + 0.05 * torch.randn(3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).to(torch.uint8)


class SyntheticShapes(torch.utils.data.Dataset):
    """`num_images` PIL images of `size` px with labels 0..9, deterministic from `seed`."""

    def __init__(self, num_images: int, size: int, seed: int, transform=None):
        self.num_images, self.size, self.seed, self.transform = num_images, size, seed, transform
        self.targets = [i % NUM_CLASSES for i in range(num_images)]
        self.classes = [str(c) for c in range(NUM_CLASSES)]

    def __len__(self):
        return self.num_images

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        img = F.to_pil_image(render(self.targets[i], self.size, g))
        return (self.transform(img) if self.transform else img), self.targets[i]
