"""In-process FID Inception-v3 in plain PyTorch, for ImageNet-scale metrics the way ADM's evaluator computes them.

The network is the FID Inception of pytorch-fid (`pt_inception-2015-12-05-6726825d.pth`): the TensorFlow graph
`classify_image_graph_def.pb` (inception-2015-12-05) that openai/guided-diffusion's evaluations/evaluator.py runs,
ported to PyTorch. Module names and state-dict keys are those of pytorch-fid / torchvision's Inception3 built with
`num_classes=1008, aux_logits=False` (no AuxLogits), so the released .pth loads strictly. It differs from
torchvision's ImageNet Inception-v3 in four places (pytorch-fid's FIDInceptionA/C/E_1/E_2):

* the 3x3 average pools in the branch_pool of Mixed_5b-d (A), Mixed_6b-e (C) and Mixed_7b (E_1) exclude the zero
  padding from the average (TF's avg_pool with SAME padding);
* Mixed_7c (E_2) uses a 3x3 *max* pool in its branch_pool;
* the classifier has 1008 outputs (TF's label map), not 1000.

Features, as ADM's evaluator (a dict, like lazydit.evaluation.fmnist.FMNISTClassifier.features):

* ``pool``    (B, 2048): the global average pool of Mixed_7c = TF "pool_3:0" -> FID, precision/recall, KID.
* ``spatial`` (B, 2023): TF "mixed_6/conv:0"[..., :7] flattened -> sFID. In the 2015 graph the Inception blocks are
  named mixed, mixed_1, ..., mixed_10 = Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c, so "mixed_6" is
  **Mixed_6d**, and "mixed_6/conv" is its first tower, the 1x1 conv (+ batch norm + ReLU) = ``Mixed_6d.branch1x1``:
  a 192-channel 17x17 map, of which ADM keeps the first 7 channels. (It is *not* the 768-channel output of the last
  Mixed_6 block that feeds Mixed_7a: that is Mixed_6e's concatenation, "mixed_7/join".) The map is flattened in
  ADM's NHWC order (h, w, c), so the 7*17*17 = 2023 values line up with ADM's; the Fréchet distance itself does not
  depend on the order.
* ``logits``  (B, 1008): class logits for the Inception Score (softmax over them). ADM (like the original
  improved-GAN IS code and torch-fidelity's "logits_unbiased") multiplies pool_3 by the "softmax/logits" weight
  *without the bias*; that is the default here. ``logits_bias=True`` adds fc.bias (pytorch-fid's full fc).

Input: float NCHW batches of RGB values in the uint8 range [0, 255] (see preprocess). Each batch is resized to 299x299
with bilinear interpolation and normalised to [-1, 1]:

* ``resize="torch"`` (default, as pytorch-fid): F.interpolate(mode="bilinear", align_corners=False, antialias=False),
  i.e. half-pixel centres. ADM's TF graph resizes with TF1's legacy ResizeBilinear (align_corners=False and *no*
  half-pixel offset: source coordinate = dst * in/out), so features, and FID, differ slightly from the TF evaluator.
  ``resize="tf1"`` reproduces the legacy TF1 sampling positions (up to float rounding) for closer agreement.
* ``normalize="pytorch-fid"`` (default): x / 127.5 - 1 (pytorch-fid's 2 * (x / 255) - 1). ADM's graph computes
  (x - 128) / 128; ``normalize="tf"`` uses that.

Absolute FID / sFID / IS from this module can therefore differ slightly from numbers produced by the TF evaluator
(pytorch-fid's README reports e.g. 0.08 FID on LSUN against TF); compare numbers from one and the same extractor.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lazydit.errors import CheckpointError
from lazydit.models.checkpoint import load_state_dict_strict

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
INPUT_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023
POOL_DIM = 2048
# 27,161,264 (torchvision Inception3, 1000 classes, with AuxLogits: its published num_params)
# - 3,326,696 (AuxLogits) + 8 * 2049 (8 more classes) = 23,850,960.
NUM_PARAMS = 23_850_960


class InceptionWeightsError(CheckpointError):
    """An Inception weights file is truncated, not a weights file, or does not fit the network (a ValueError)."""


# ---------------------------------------------------------------- network


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, as TF) + ReLU. Keys: conv.weight, bn.{weight,bias,running_*}."""

    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg_pool3(x):
    """3x3 stride-1 SAME average pool that, like TF, averages over the valid (unpadded) inputs only."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | TF avg pool-1x1."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """17x17 block (Mixed_6b-e): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | TF avg pool-1x1."""

    def __init__(self, cin, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def branches(self, x):
        """The four branch outputs [1x1 (TF "<block>/conv"), 7x7, 7x7dbl, pool], each (B, 192, H, W)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = m(bd)
        bp = self.branch_pool(_tf_avg_pool3(x))
        return [b1, b7, bd, bp]

    def forward(self, x):
        return torch.cat(self.branches(x), 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _FIDInceptionE(nn.Module):
    """8x8 block: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1. Subclasses choose the pool."""

    def __init__(self, cin):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def pool(self, x):
        raise NotImplementedError

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        bp = self.branch_pool(self.pool(x))
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInceptionE_1(_FIDInceptionE):  # noqa: N801 (pytorch-fid's name)
    """Mixed_7b: TF average pool (padding excluded) in branch_pool."""

    def pool(self, x):
        return _tf_avg_pool3(x)


class FIDInceptionE_2(_FIDInceptionE):  # noqa: N801
    """Mixed_7c: the TF graph uses a 3x3 *max* pool in branch_pool here."""

    def pool(self, x):
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _resize_tf1_bilinear(x, size):
    """TF1 legacy ResizeBilinear (align_corners=False, half_pixel_centers=False): src = dst * in / out, edge clamp."""
    oh, ow = size

    def axis(n_in, n_out):
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = torch.arange(n_out, dtype=torch.float32) * scale
        i0 = src.floor().long().clamp_(max=n_in - 1)
        i1 = (i0 + 1).clamp_(max=n_in - 1)
        return i0.to(x.device), i1.to(x.device), (src - i0.float()).to(device=x.device, dtype=x.dtype)

    y0, y1, ly = axis(x.shape[-2], oh)
    x0, x1, lx = axis(x.shape[-1], ow)
    top, bottom = x[..., y0, :], x[..., y1, :]  # (B, C, oh, W)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * lx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * lx
    return top + (bottom - top) * ly[:, None]


class InceptionV3FID(nn.Module):
    """pytorch-fid's FID Inception-v3 (TF inception-2015-12-05) returning ADM's evaluator features.

    Args:
        resize: "torch" (pytorch-fid: bilinear, align_corners=False, no antialias) or "tf1" (TF1 legacy bilinear,
            as ADM's graph). Inputs already 299x299 are not resized.
        normalize: "pytorch-fid" (x / 127.5 - 1) or "tf" ((x - 128) / 128, as ADM's graph).
        logits_bias: add fc.bias to the logits (ADM's Inception Score leaves it out; default False).

    ``features(x)`` takes float (B, 3, H, W) (or (B, 1, H, W), repeated to RGB) in [0, 255] and returns
    dict(pool (B, 2048), spatial (B, 2023) = Mixed_6d.branch1x1[:, :7] in (h, w, c) order, logits (B, 1008));
    see the module docstring for the TF layer each comes from. Weights are frozen; build with load_inception.
    """

    def __init__(self, resize="torch", normalize="pytorch-fid", logits_bias=False):
        super().__init__()
        if resize not in ("torch", "tf1"):
            raise ValueError(f"resize must be 'torch' or 'tf1', got {resize!r}")
        if normalize not in ("pytorch-fid", "tf"):
            raise ValueError(f"normalize must be 'pytorch-fid' or 'tf', got {normalize!r}")
        self.resize, self.normalize, self.logits_bias = resize, normalize, bool(logits_bias)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def preprocess(images) -> torch.Tensor:
        """extractor.preprocess(uint8 (N, H, W, C)) -> float (N, 3, H, W) in [0, 255]: the module's preprocess."""
        return preprocess(images)

    def _prepare(self, x):
        """float (B, C, H, W) in [0, 255] -> (B, 3, 299, 299) in [-1, 1] on the weights' device and dtype."""
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected a (B, 3, H, W) tensor in [0, 255], got {getattr(x, 'shape', type(x))}")
        w = self.Conv2d_1a_3x3.conv.weight
        x = x.to(device=w.device, dtype=w.dtype)
        if x.numel() and float(x.min()) < 0:
            raise ValueError("InceptionV3FID.features takes images in [0, 255] (uint8 range) and got negative values;"
                             " images in [-1, 1]? convert uint8 images with lazydit.evaluation.inception.preprocess")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            if self.resize == "torch":
                x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            else:
                x = _resize_tf1_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        return x / 127.5 - 1.0 if self.normalize == "pytorch-fid" else (x - 128.0) / 128.0

    def features(self, x) -> dict:
        """dict(pool (B, 2048), spatial (B, 2023), logits (B, 1008)) of float images x (B, 3, H, W) in [0, 255]."""
        x = self._prepare(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (B, 768, 17, 17)
        branches = self.Mixed_6d.branches(x)
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # TF mixed_6/conv[..., :7]
        x = self.Mixed_6e(torch.cat(branches, 1))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # TF pool_3
        logits = F.linear(pool, self.fc.weight, self.fc.bias if self.logits_bias else None)
        return dict(pool=pool, spatial=spatial, logits=logits)

    def forward(self, x) -> dict:
        return self.features(x)


# ---------------------------------------------------------------- images


def preprocess(images) -> torch.Tensor:
    """uint8 images (N, H, W, C) with C in {1, 3}, or (N, H, W), numpy or torch -> float32 (N, 3, H, W) in [0, 255].

    Grayscale images are repeated to 3 channels. No resizing: InceptionV3FID.features resizes to 299x299.
    """
    if torch.is_tensor(images):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (ADM .npz layout), got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, C) uint8 with C in (1, 3) or (N, H, W), got {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.contiguous()


# ---------------------------------------------------------------- weights


def _missing_weights(path):
    return FileNotFoundError(
        f"Inception weights not found: {path}. Download pytorch-fid's FID Inception weights "
        f"({FID_WEIGHTS_NAME}) from {FID_WEIGHTS_URL} and pass the file's path (a .safetensors conversion "
        "of the same state dict works too).")


def read_inception_state_dict(path) -> dict:
    """The state dict in a pytorch-fid style .pth (plain state dict) or a .safetensors file, as CPU tensors."""
    path = Path(path)
    if not path.is_file():
        raise _missing_weights(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated downloads, HTML error pages, other formats
        raise InceptionWeightsError(f"{path}: truncated or not a weights file ({type(e).__name__}: {e}); "
                                    f"download it again from {FID_WEIGHTS_URL}") from e
    if not isinstance(state, dict) or not state:
        raise InceptionWeightsError(f"{path}: not a weights file (expected a state dict, found "
                                    f"{type(state).__name__}{' (empty)' if isinstance(state, dict) else ''})")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise InceptionWeightsError(f"{path}: not a plain state dict (non-tensor entries: {bad[:8]})")
    return state


def load_inception(path, device="cpu", **kwargs) -> InceptionV3FID:
    """Build InceptionV3FID, load the weights file strictly, return it frozen in eval mode on `device`.

    Args:
        path: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (plain state dict) or a .safetensors with the
            same keys.
        device: where the network runs.
        **kwargs: InceptionV3FID options (resize, normalize, logits_bias).
    Raises:
        FileNotFoundError (with the download URL) if path is missing; InceptionWeightsError (a ValueError) if the file
        is truncated, not a weights file, or has missing / unexpected / mis-shaped keys.
    """
    state = dict(read_inception_state_dict(path))
    model = InceptionV3FID(**kwargs)
    # BatchNorm's num_batches_tracked counters are unused in eval; files converted from TF may not carry them.
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)
    try:
        load_state_dict_strict(model, state, source=f"Inception weights {path}")
    except CheckpointError as e:
        raise InceptionWeightsError(f"{e}\n  (expected pytorch-fid's {FID_WEIGHTS_NAME}, from {FID_WEIGHTS_URL})") \
            from None
    return model.eval().to(device)


__all__ = ["InceptionV3FID", "load_inception", "read_inception_state_dict", "preprocess", "InceptionWeightsError",
           "FID_WEIGHTS_URL", "FID_WEIGHTS_NAME", "NUM_PARAMS", "POOL_DIM", "SPATIAL_DIM", "NUM_CLASSES"]
