"""Feature extractors: the FID Inception-v3 (random weights), the registry, custom modules."""

import pytest
import torch

from dmm.registry import RegistryError
from eval.features import (
    FEATURE_EXTRACTORS,
    FeatureConfig,
    ModuleFeatures,
    build_feature_extractor,
    resize_images,
)
from eval.inception import FIDInceptionV3

# name -> shape of a few parameters of the standard FID network (pt_inception-2015-12-05 layout)
EXPECTED = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
}


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return FIDInceptionV3().eval()


def test_inception_layout(inception):
    state = inception.state_dict()
    for k, shape in EXPECTED.items():
        assert tuple(state[k].shape) == shape, k
    assert not any(k.startswith("AuxLogits") for k in state)
    # torchvision's inception_v3 without aux logits, with the 1008-way classifier of the FID graph
    assert sum(p.numel() for p in inception.parameters()) == 23_850_960
    assert inception.Mixed_7b.pool_mode == "avg" and inception.Mixed_7c.pool_mode == "max"


def test_inception_features_and_loading(inception, tmp_path):
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = inception(images)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(inception.state_dict(), path)
    ext = build_feature_extractor(FeatureConfig(name="inception", weights=str(path)))
    torch.testing.assert_close(ext(images), feats)
    assert ext.describe()["resize"] == "bilinear" and ext.describe()["weights"] == str(path)
    assert ext.extract(images, batch_size=1).dtype == torch.float64


def test_inception_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        build_feature_extractor(FeatureConfig(name="inception", weights=str(tmp_path / "missing.pth")))
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        FIDInceptionV3.from_file(None)
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not the FID Inception-v3 state_dict"):
        FIDInceptionV3.from_file(tmp_path / "wrong.pth")


def test_resize_modes_differ_and_are_checked():
    x = torch.rand(1, 3, 17, 17, generator=torch.Generator().manual_seed(2))
    outs = {m: resize_images(x, 8, m) for m in ("bilinear", "bilinear-antialias", "bicubic-pil")}
    assert all(o.shape == (1, 3, 8, 8) for o in outs.values())
    assert not torch.allclose(outs["bilinear"], outs["bilinear-antialias"])
    with pytest.raises(ValueError, match="unknown resize mode"):
        resize_images(x, 8, "lanczos")


def test_registry_accepts_any_module():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))

    @FEATURE_EXTRACTORS.register("tiny-test-net", description="a tiny conv net (test)")
    def _factory(cfg):
        torch.manual_seed(0)
        return ModuleFeatures(Tiny(), name="tiny-test-net", input_size=16, resize=cfg.resize)

    try:
        ext = build_feature_extractor("tiny-test-net")
        assert ext.dim == 5
        assert ext(torch.rand(3, 3, 32, 32)).shape == (3, 5)
        assert ext.describe()["input_size"] == 16
    finally:
        FEATURE_EXTRACTORS.remove("tiny-test-net")
    with pytest.raises(RegistryError, match="unknown feature extractor 'tiny-test-net'"):
        build_feature_extractor("tiny-test-net")
