"""Learning on real images: MMCR with the small test CNN on 1,000 real CIFAR-10 images (from the
shared folder beside the repository) lifts kNN well above the untrained network's."""
import pytest

from helpers import read_metrics, use_tiny_cnn
from mmcr import model as mmcr_model
from mmcr import pretrain
from real_images import DATA, make_split

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"no shared real images at {DATA}")


def test_mmcr_lifts_knn_on_real_images(tmp_path, monkeypatch):
    n_train, n_test = make_split(DATA, tmp_path / "split", every=4)
    assert (n_train, n_test) == (1000, 250)
    use_tiny_cnn(monkeypatch, mmcr_model)
    pretrain.main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "split"),
                   "--batch-size", "64", "--num-views", "4", "--max-epochs", "8",
                   "--learning-rate", "3e-3", "--num-workers", "0", "--num-neighbours", "20",
                   "--temperature", "0.1", "--eval-every", "8", "--seed", "42",
                   "--output-dir", str(tmp_path / "run")])
    untrained, trained = read_metrics(tmp_path / "run")[0], read_metrics(tmp_path / "run")[-1]
    assert trained["knn_top1"] > untrained["knn_top1"] + 5.0, (untrained, trained)
