"""The FID Inception-v3 (2015-12-05 TF graph) in plain torch, and the ``inception`` feature extractor.

Written here (no torchvision) so that FID needs only torch and a local weights file, by default
the pytorch-fid / torch-fidelity file ``pt_inception-2015-12-05-6726825d.pth``. Nothing is
downloaded: a missing file is an error that says which file to pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from eval.features import (
    FEATURE_EXTRACTORS,
    RESIZE_MODES,
    FeatureConfig,
    FeatureExtractor,
    ModuleFeatures,
    resize_images,
)

__all__ = ["INCEPTION_WEIGHTS_NAME", "FIDInceptionV3", "InceptionFeatures"]

INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


class _ConvBN(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU; attribute names follow the FID checkpoint."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _pool_branch(x, mode: str):
    """3x3 stride-1 pooling before a pool-branch 1x1 conv (the FID network's variants)."""
    if mode == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _Mixed35(nn.Module):  # 35x35 grid: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | pool->1x1
    def __init__(self, cin: int, pool_ch: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_ch, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_pool_branch(x, "avg"))], 1)


class _Reduce35(nn.Module):  # 35 -> 17 grid reduction
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class _Mixed17(nn.Module):  # 17x17 grid with factorised 7x7 convolutions
    def __init__(self, cin: int, mid: int):
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, mid, 1)
        self.branch7x7_2 = _ConvBN(mid, mid, row[0], padding=row[1])
        self.branch7x7_3 = _ConvBN(mid, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = _ConvBN(cin, mid, 1)
        self.branch7x7dbl_2 = _ConvBN(mid, mid, col[0], padding=col[1])
        self.branch7x7dbl_3 = _ConvBN(mid, mid, row[0], padding=row[1])
        self.branch7x7dbl_4 = _ConvBN(mid, mid, col[0], padding=col[1])
        self.branch7x7dbl_5 = _ConvBN(mid, 192, row[0], padding=row[1])
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_pool_branch(x, "avg"))], 1)


class _Reduce17(nn.Module):  # 17 -> 8 grid reduction
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _Mixed8(nn.Module):  # 8x8 grid with split 1x3 / 3x1 outputs; pool_mode differs per block
    def __init__(self, cin: int, pool_mode: str):
        super().__init__()
        self.pool_mode = pool_mode
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)], 1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(_pool_branch(x, self.pool_mode))], 1)


class FIDInceptionV3(nn.Module):
    """The Inception-v3 variant used for FID (2015-12-05 TF graph), returning 2048-d pool features.

    Input: ``[B, 3, H, W]`` in ``[0, 1]``; resized to 299 x 299 with ``resize`` and scaled to
    ``[-1, 1]``. Parameter names match ``pt_inception-2015-12-05-6726825d.pth`` (1008-way ``fc``
    included so that the file loads strictly; the classifier is not used for features).
    """

    dim = 2048
    input_size = 299

    def __init__(self, resize: str = "bilinear"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
        self.resize = resize
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _Mixed35(192, 32)
        self.Mixed_5c = _Mixed35(256, 64)
        self.Mixed_5d = _Mixed35(288, 64)
        self.Mixed_6a = _Reduce35(288)
        self.Mixed_6b = _Mixed17(768, 128)
        self.Mixed_6c = _Mixed17(768, 160)
        self.Mixed_6d = _Mixed17(768, 160)
        self.Mixed_6e = _Mixed17(768, 192)
        self.Mixed_7a = _Reduce17(768)
        self.Mixed_7b = _Mixed8(1280, "avg")
        self.Mixed_7c = _Mixed8(2048, "max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_images(images, self.input_size, self.resize) * 2.0 - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    @classmethod
    def from_file(cls, path: str | Path | None, resize: str = "bilinear") -> FIDInceptionV3:
        """Load the FID weights from a local file; a clear error when it is missing or wrong."""
        if not path:
            raise FileNotFoundError(
                f"the 'inception' feature extractor needs a local weights file ({INCEPTION_WEIGHTS_NAME}, "
                "the pytorch-fid / torch-fidelity FID Inception): pass --inception-weights PATH "
                "(FeatureConfig.weights). Nothing is downloaded."
            )
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights file not found: {path} (set by --inception-weights / FeatureConfig.weights; "
                f"expected {INCEPTION_WEIGHTS_NAME}). Nothing is downloaded."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"{path}: not a loadable state_dict ({type(exc).__name__}: {exc}); expected {INCEPTION_WEIGHTS_NAME} "
                "(TorchScript files such as clean-fid's inception-2015-12-05.pt are not supported)"
            ) from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        model = cls(resize=resize)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(f"{path}: not the FID Inception-v3 state_dict ({exc})") from exc
        # files converted with old torch versions carry no BatchNorm step counters; nothing uses them
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"{path}: not the FID Inception-v3 state_dict ({len(missing)} missing keys, e.g. {missing[:3]}; "
                f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
            )
        return model.eval()


class InceptionFeatures(ModuleFeatures):
    def __init__(self, model: FIDInceptionV3, weights: str | None, device: str = "cpu"):
        super().__init__(model, name="inception", dim=2048, device=device,
                         info={"network": "FID Inception-v3 (2015-12-05), pool3 2048-d",
                               "weights": str(weights) if weights else "random (test only)",
                               "input_size": 299, "resize": model.resize})


@FEATURE_EXTRACTORS.register("inception", description="FID Inception-v3 (2015-12-05) pool3 features, 2048-d, "
                             "from a local weights file (--inception-weights)")
def _build_inception(cfg: FeatureConfig) -> FeatureExtractor:
    return InceptionFeatures(FIDInceptionV3.from_file(cfg.weights, resize=cfg.resize), cfg.weights, cfg.device)
