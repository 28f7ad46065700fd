"""CoAtNet: Marrying Convolution and Attention for All Data Sizes (Dai et al., 2021).

Paper: https://arxiv.org/abs/2106.04803

Layout C-C-T-T (paper Table 3): a two-conv stem S0, two MBConv stages S1/S2 and two Transformer
stages S3/S4 with 2-D relative attention, then global pooling and a classifier head. Variants are
data (``MODEL_CFGS``); parameter names follow timm's ``maxxvit.py`` so timm weights convert 1:1
(see ``src/convert_timm.py``). This module knows nothing of datasets, config files or devices: a model
is built with MindSpore's own ops, and ``src.kernels.use_fused_kernels(net)`` switches the cells that
have a fused CPU kernel (their ``set_fused``) to it.

Why one long file: the variant table, each block and the model read together as the paper does (timm keeps
maxxvit.py whole for the same reason); the relative-position table resize at the end is the one piece that
checkpoints of another resolution need, and it is kept beside the table it resizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import initializer as init

from src import kernels

__all__ = [
    "CoAtNet",
    "ConvCfg",
    "TransformerCfg",
    "CoAtNetCfg",
    "MODEL_CFGS",
    "create_model",
    "list_models",
    "rel_pos_index",
    "resize_rel_pos_bias_table",
    "resize_rel_pos_tables",
]


# --------------------------------------------------------------------------------------------------
# Variants as data
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvCfg:
    """MBConv block and stem settings (paper Sec. 2.1 / Appendix A.1)."""

    expand_ratio: float = 4.0
    expand_output: bool = True  # mid channels from output (paper) or input (original, timm 'rw') width
    # Where a stride-2 block downsamples: in the depthwise conv ('dw'), by a 2x2 pool before the
    # expansion ('pool'), or in the 1x1 expansion conv itself ('expand', the original MindSpore code).
    stride_mode: str = "dw"
    pool_type: str = "avg"  # 2x2 pool of the shortcut (and of stride_mode 'pool'): 'avg' | 'max'
    always_project: bool = False  # 1x1 shortcut conv on downsampling even when the width is unchanged
    pre_norm_act: bool = False  # activation after the pre-norm ('rw' variants)
    output_bias: bool = True  # bias on the shortcut and final 1x1 projection
    se_early: bool = False  # squeeze-excitation before norm2 instead of after it
    se_ratio: float = 0.25
    se_from_input: bool = False  # SE width from the block's input width (original) instead of out/mid
    se_act: str = "silu"
    act: str = "gelu"  # 'gelu' (exact erf) | 'gelu_tanh' (MindSpore's nn.GELU()) | 'silu'
    norm_eps: float = 1e-5
    norm_momentum: float = 0.9  # MindSpore convention: weight of the old running statistic
    stem_padding: str = "symmetric"  # stride-2 stem conv: 1 each side, or MindSpore 'same' (0 before, 1 after)


@dataclass(frozen=True)
class TransformerCfg:
    """Transformer block settings (paper Sec. 2.2: relative attention, MLP ratio 4, head dim 32)."""

    dim_head: int = 32
    expand_ratio: float = 4.0
    expand_first: bool = True  # channel expansion in qkv (paper) or in the output projection ('rw')
    shortcut_bias: bool = True
    pool_type: str = "avg"  # 2x2 pool of the shortcut and before attention on downsampling: 'avg' | 'max'
    always_project: bool = False  # shortcut projection on downsampling even when the width is unchanged
    qk_scale_split: bool = False  # scale q and k each by dim_head^-0.25 (original) instead of q by ^-0.5
    # How a checkpoint's bias tables are resized to a new window (fine-tuning 224 -> 384): 'bicubic'
    # (timm) or 'bilinear' with align_corners=True (the original's finetune.py, ResizeBilinear).
    rel_pos_resize: str = "bicubic"
    norm: str = "layernorm"  # 'layernorm' | 'batchnorm'
    norm_eps: float = 1e-6
    init_values: float | None = None  # LayerScale init; None disables LayerScale
    act: str = "gelu"


@dataclass(frozen=True)
class CoAtNetCfg:
    embed_dim: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    stem_width: tuple[int, int]
    head_hidden_size: int | None = None  # paper head: pool-LN-Dense-Tanh-Dense; None: LN-pool-Dense
    conv: ConvCfg = field(default_factory=ConvCfg)
    transformer: TransformerCfg = field(default_factory=TransformerCfg)
    block_types: tuple[str, str, str, str] = ("C", "C", "T", "T")
    drop_path_rate: float = 0.3  # the variant's own stochastic-depth rate (used unless one is given)
    # 'timm': EfficientNet fan-out normal for convs, xavier-uniform for transformer and head (timm's
    # 'vit_eff'); 'normal': MindSpore 1.6's defaults the original relied on, N(0, 0.01) for every conv
    # and dense kernel, zero biases, TruncatedNormal(0.01) relative-position tables.
    init: str = "timm"


def _seed(embed_dim, depths, stem: int, drop_path_rate: float) -> CoAtNetCfg:
    # The original MindSpore CoAtNet (hw666666666666/CoAtNet, src/coatnet.py) behind the seed's ImageNet
    # table: expansion and SE width from the block input, stride in the 1x1 expansion conv, 2x2 max-pool
    # shortcuts that always project, BatchNorm eps 1e-3 / momentum 0.99, LayerNorm eps 1e-5,
    # MindSpore's tanh GELU, 'same' stem padding, q and k each scaled by dim_head^-0.25.
    return CoAtNetCfg(
        tuple(embed_dim), tuple(depths), (stem, stem), embed_dim[-1],
        conv=ConvCfg(expand_output=False, stride_mode="expand", pool_type="max", always_project=True,
                     se_from_input=True, act="gelu_tanh", norm_eps=1e-3, norm_momentum=0.99,
                     stem_padding="same"),
        transformer=TransformerCfg(pool_type="max", always_project=True, qk_scale_split=True, norm_eps=1e-5,
                                   act="gelu_tanh", rel_pos_resize="bilinear"),
        drop_path_rate=drop_path_rate, init="normal")


def _rw_coat(stride_mode="pool", se_early=False, se_act="relu", shortcut_bias=True, norm="layernorm",
             init_values=None) -> dict:
    # timm's 'rw' CoAtNets (trained before the official code was public): activation after the
    # pre-norm, expansion from the input width, no bias on shortcut/projection, SiLU, ReLU SE,
    # expansion in the attention output projection.
    return dict(
        conv=ConvCfg(expand_output=False, stride_mode=stride_mode, pre_norm_act=True, output_bias=False,
                     se_early=se_early, se_act=se_act, act="silu"),
        transformer=TransformerCfg(expand_first=False, shortcut_bias=shortcut_bias, norm=norm,
                                   init_values=init_values),
    )


def _rw_max(stride_mode="dw") -> dict:
    return dict(
        conv=ConvCfg(expand_output=False, stride_mode=stride_mode, output_bias=True, act="silu"),
        transformer=TransformerCfg(expand_first=False),
    )


#: Paper Table 3 as the original MindSpore project built it (coatnet_0 ... coatnet_4; its drop-path
#: rates for 0/1/2, 0.7 for 3/4 our choice: it had no such variants), and timm's structures under
#: timm's own names.
#: name: (embed_dim S1-S4, depths S1-S4, stem width S0, drop path) / (embed_dim, depths, stem widths, head)
MODEL_CFGS: dict[str, CoAtNetCfg] = {
    # ---- the original MindSpore CoAtNet (seed README's table) ----------------------------------
    "coatnet_0": _seed((96, 192, 384, 768), (2, 3, 5, 2), 64, 0.2),
    "coatnet_1": _seed((96, 192, 384, 768), (2, 6, 14, 2), 64, 0.3),
    "coatnet_2": _seed((128, 256, 512, 1024), (2, 6, 14, 2), 128, 0.5),
    "coatnet_3": _seed((192, 384, 768, 1536), (2, 6, 14, 2), 192, 0.7),
    "coatnet_4": _seed((192, 384, 768, 1536), (2, 12, 28, 2), 192, 0.7),
    # ---- tests and the CPU demo: the original's design, every stage type, runs at 32x32 ------------
    "coatnet_tiny": _seed((32, 48, 64, 128), (1, 1, 2, 1), 16, 0.1),
    # ---- timm's paper structures and 'rw' variants with published ImageNet weights ---------------
    "coatnet_0_224": CoAtNetCfg((96, 192, 384, 768), (2, 3, 5, 2), (64, 64), 768),
    "coatnet_1_224": CoAtNetCfg((96, 192, 384, 768), (2, 6, 14, 2), (64, 64), 768),
    "coatnet_2_224": CoAtNetCfg((128, 256, 512, 1024), (2, 6, 14, 2), (128, 128), 1024),
    "coatnet_3_224": CoAtNetCfg((192, 384, 768, 1536), (2, 6, 14, 2), (192, 192), 1536),
    "coatnet_4_224": CoAtNetCfg((192, 384, 768, 1536), (2, 12, 28, 2), (192, 192), 1536),
    "coatnet_nano_rw_224": CoAtNetCfg((64, 128, 256, 512), (3, 4, 6, 3), (32, 64), None, **_rw_max("pool")),
    "coatnet_0_rw_224": CoAtNetCfg((96, 192, 384, 768), (2, 3, 7, 2), (32, 64), None,
                                   **_rw_coat(se_early=True, shortcut_bias=False)),
    "coatnet_1_rw_224": CoAtNetCfg((96, 192, 384, 768), (2, 6, 14, 2), (32, 64), None,
                                   **_rw_coat("dw", se_early=True, shortcut_bias=False)),
    "coatnet_2_rw_224": CoAtNetCfg((128, 256, 512, 1024), (2, 6, 14, 2), (64, 128), None,
                                   **_rw_coat("dw", se_act="silu")),
    "coatnet_3_rw_224": CoAtNetCfg((192, 384, 768, 1536), (2, 6, 14, 2), (96, 192), None,
                                   **_rw_coat("dw", se_act="silu", init_values=1e-6)),
    "coatnet_bn_0_rw_224": CoAtNetCfg((96, 192, 384, 768), (2, 3, 7, 2), (32, 64), None,
                                      **_rw_coat("dw", se_early=True, shortcut_bias=False, norm="batchnorm")),
}

#: The variants whose structure (and parameter names after src/convert_timm.py) is timm's.
TIMM_MODELS: tuple[str, ...] = tuple(name for name in MODEL_CFGS if name.endswith("_224"))

#: Eval preprocessing of each variant's weights (timm's default_cfgs idea), the one place eval, export, the
#: converter and the "auto" eval resize ask. The original family: the original's eval (ImageNet mean/std,
#: both sides resized to size / 0.875, bicubic: "squash"). timm's names: the pretrained_cfg of timm's ImageNet
#: weights (mean/std 0.5, crop_pct 0.95, shorter side resized: "aspect"; tests/test_convert_timm.py checks
#: them against timm). A config key given explicitly, or a checkpoint's sidecar, wins over these.
_IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_ORIGINAL_EVAL = dict(image_mean=_IMAGENET_MEAN_STD[0], image_std=_IMAGENET_MEAN_STD[1], crop_pct=0.875,
                      interpolation="bicubic", eval_resize="squash")
_TIMM_EVAL = dict(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), crop_pct=0.95, interpolation="bicubic",
                  eval_resize="aspect")
PRETRAINED_CFGS: dict[str, dict] = {name: dict(_TIMM_EVAL if name in TIMM_MODELS else _ORIGINAL_EVAL)
                                    for name in MODEL_CFGS}
PRETRAINED_CFGS["coatnet_nano_rw_224"]["crop_pct"] = 0.9
PRETRAINED_CFGS["coatnet_bn_0_rw_224"].update(image_mean=_IMAGENET_MEAN_STD[0], image_std=_IMAGENET_MEAN_STD[1])


def list_models() -> list[str]:
    return sorted(MODEL_CFGS)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------
def make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class GELU(nn.Cell):
    """GELU, exact (``approximate="none"``, timm) or MindSpore's tanh form (``"tanh"``, what the
    original's ``nn.GELU()`` computes).

    After ``set_fused(True)``, float32 inputs go through the fused CPU kernel of ``src.kernels`` (one pass
    forward, one backward; MindSpore's own Erf-based lowering took ~30 % of a CoAtNet-0 train step), where
    it is available. ONNX export swaps in ``src.onnx_export.ExportGELU``.
    """

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate
        self.fused = None

    def set_fused(self, on: bool) -> None:
        """The fused kernel where it applies (``on``: see ``src.kernels.use_fused_kernels``), else MindSpore's ops."""
        self.fused = kernels.gelu(self.approximate) if on else None

    def construct(self, x):
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x)
        return ops.gelu(x, approximate=self.approximate)


_GELU_FORMS = {"gelu": "none", "gelu_tanh": "tanh"}


def _act(name: str) -> nn.Cell:
    if name in _GELU_FORMS:
        return GELU(_GELU_FORMS[name])
    if name == "silu":
        return nn.SiLU()
    if name == "relu":
        return nn.ReLU()
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"unknown activation '{name}'")


class LayerNorm2d(nn.Cell):
    """LayerNorm over the channel axis of an NCHW tensor, computed in float32.

    Normalising over axis 1 directly avoids two NCHW<->NHWC transposes per call; float32 keeps the
    statistics safe under float16 mixed precision. After ``set_fused(True)``, float32 inputs go through the
    fused CPU kernel of ``src.kernels`` (MindSpore's reductions over axis 1 and their gradients took ~0.2 s
    of a CoAtNet-0 train step)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gamma = Parameter(init.initializer("ones", (num_channels,), ms.float32), name="gamma")
        self.beta = Parameter(init.initializer("zeros", (num_channels,), ms.float32), name="beta")
        self.fused = None
        self.eps_tensor = Tensor(np.array([eps], np.float32))  # the kernel takes eps as a (1,) tensor

    def set_fused(self, on: bool) -> None:
        """The fused kernel where it applies (``on``: see ``src.kernels.use_fused_kernels``), else MindSpore's ops."""
        self.fused = kernels.layernorm2d() if on else None

    def construct(self, x):
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x, self.gamma, self.beta, self.eps_tensor)[0]
        dtype = x.dtype
        x = x.astype(ms.float32)
        mean = x.mean(axis=1, keep_dims=True)
        xc = x - mean
        var = (xc * xc).mean(axis=1, keep_dims=True)
        y = xc * ops.rsqrt(var + self.eps)
        y = y * self.gamma.reshape(1, -1, 1, 1) + self.beta.reshape(1, -1, 1, 1)
        return y.astype(dtype)


def _norm2d(kind: str, channels: int, eps: float) -> nn.Cell:
    if kind == "layernorm":
        return LayerNorm2d(channels, eps)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels, eps=eps, momentum=0.9)
    raise ValueError(f"unknown norm '{kind}'")


class BatchNormAct2d(nn.Cell):
    """BatchNorm2d followed by an optional activation (names match timm's BatchNormAct2d).

    After ``set_fused(True)``, on float32 inputs, the normalisation is a fused CPU kernel of ``src.kernels``
    (``fused`` in training, ``fused_inference`` in eval mode), which also applies a GELU activation itself
    (in training without storing the normalised tensor: the backward recomputes it). In training the
    running statistics are updated here exactly as ``nn.BatchNorm2d`` does (unbiased variance); in eval
    mode the kernel applies them as one per-channel scale and shift."""

    def __init__(self, channels: int, act: str | None, eps: float = 1e-5, momentum: float = 0.9):
        super().__init__()
        # MindSpore momentum is the weight of the old statistic: 0.9 == PyTorch's 0.1.
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
        self.act = _act(act) if act else None
        self.act_name = act
        self.fused_act = act in _GELU_FORMS  # the kernels apply the activation themselves
        self.fused = self.fused_inference = None
        self.eps_tensor = Tensor(np.array([eps], np.float32))  # the kernels take eps as a (1,) tensor

    def set_fused(self, on: bool) -> None:
        """The fused kernels where they apply (``on``: see ``src.kernels.use_fused_kernels``), else MindSpore's ops."""
        act = self.act_name if self.fused_act else None
        train = kernels.batchnorm_train(act) if on else None
        inference = kernels.batchnorm_inference(act) if train is not None else None
        self.fused, self.fused_inference = (train, inference) if inference is not None else (None, None)

    def _fused_train(self, x):
        return self.train_with(self.fused, x)

    def train_with(self, op, x, weight=None):
        """``op(x, gamma, beta, eps[, weight]) -> (y, batch mean, batch variance)`` (this BatchNorm's kernel, or
        one that continues into the next layer with its ``weight``), the running statistics updated from it."""
        if weight is None:
            y, mean, var = op(x, self.bn.gamma, self.bn.beta, self.eps_tensor)
        else:
            y, mean, var = op(x, self.bn.gamma, self.bn.beta, self.eps_tensor, weight)
        mean = ops.stop_gradient(mean)
        n = x.shape[0] * x.shape[2] * x.shape[3]
        var = ops.stop_gradient(var) * (n / max(n - 1, 1))
        new = self.bn.momentum  # weight of the batch statistic (1 - the momentum given to nn.BatchNorm2d)
        update_mean = ops.assign(self.bn.moving_mean, self.bn.moving_mean * (1.0 - new) + mean * new)
        update_var = ops.assign(self.bn.moving_variance, self.bn.moving_variance * (1.0 - new) + var * new)
        return ops.depend(y, ops.depend(update_mean, update_var))

    def _fused_inference(self, x):
        scale = self.bn.gamma / ops.sqrt(self.bn.moving_variance + self.eps_tensor)
        return self.fused_inference(x, scale, self.bn.beta - self.bn.moving_mean * scale)

    def construct(self, x):
        if self.fused is not None and x.dtype == ms.float32:
            x = self._fused_train(x) if self.training else self._fused_inference(x)
            if self.act is not None and not self.fused_act:
                x = self.act(x)
            return x
        x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        return x


def _padding(k: int, stride: int) -> dict:
    """nn.Conv2d padding arguments: symmetric (k - 1) // 2 as timm's create_conv2d(padding='') for odd k."""
    pad = ((stride - 1) + (k - 1)) // 2
    return {"pad_mode": "pad" if pad else "valid", "padding": pad}


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = True) -> nn.Conv2d:
    if k == 1 and stride > 1 and groups == 1:
        return StridedConv1x1(cin, cout, stride, bias)
    if k == 1 and groups == 1:
        return _conv1x1(cin, cout, bias)
    return nn.Conv2d(cin, cout, k, stride=stride, group=groups, has_bias=bias, **_padding(k, stride))


def _conv1x1(cin: int, cout: int, bias: bool) -> nn.Conv2d:
    return Conv1x1(cin, cout) if bias else nn.Conv2d(cin, cout, 1, has_bias=False)


class _BiasAdd(nn.Cell):
    """MindSpore's BiasAdd, its bias gradient the fused channel-sum kernel ``channel_sum``."""

    def __init__(self, channel_sum):
        super().__init__()
        self.bias_add = ops.BiasAdd()
        self.channel_sum = channel_sum

    def construct(self, x, bias):
        return self.bias_add(x, bias)

    def bprop(self, x, bias, out, dout):
        return dout, self.channel_sum(dout)


class Conv1x1(nn.Conv2d):
    """1x1 convolution with bias: an ``nn.Conv2d`` (same parameters) whose bias gradient, after
    ``set_fused(True)`` and for float32 outputs, is the channel-sum kernel of ``src.kernels`` (MindSpore
    2.10's CPU BiasAddGrad: ~17 ms of a CoAtNet-0 train step for 45 calls)."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__(in_chs, out_chs, 1, has_bias=True)
        self.fused = None

    def set_fused(self, on: bool) -> None:
        """The fused kernel where it applies (``on``: see ``src.kernels.use_fused_kernels``), else MindSpore's ops."""
        channel_sum = kernels.channel_sum() if on else None
        self.fused = _BiasAdd(channel_sum) if channel_sum is not None else None

    def construct(self, x):
        y = self.conv2d(x, self.weight)
        if self.fused is not None and y.dtype == ms.float32:
            return self.fused(y, self.bias)
        return self.bias_add(y, self.bias)


class StridedConv1x1(nn.Conv2d):
    """1x1 convolution with stride > 1 (the original network's MBConv expansion): an ``nn.Conv2d`` that, after
    ``set_fused(True)``, takes float32 inputs through a 1x1 average pool of that stride (every stride-th
    pixel, exactly) and a stride-1 1x1 convolution: MindSpore 2.10's oneDNN runs a strided convolution on
    its reference path on CPUs that allow AVX-512, a pool and a 1x1 convolution on the fast ones."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, bias: bool):
        super().__init__(in_chs, out_chs, 1, stride=stride, has_bias=bias, pad_mode="valid")
        self.subsample = ops.AvgPool(kernel_size=1, strides=stride)
        self.conv1x1 = ops.Conv2D(out_chs, 1)
        self.fused = None  # True: pool + 1x1 convolution; None: MindSpore's strided convolution

    def set_fused(self, on: bool) -> None:
        """The pool + 1x1 form where the fused kernels apply (``on``: see ``src.kernels.use_fused_kernels``)."""
        self.fused = True if on and kernels.kernels_enabled() else None

    def construct(self, x):
        if self.fused is not None and x.dtype == ms.float32:
            y = self.conv1x1(self.subsample(x), self.weight)
        else:
            y = self.conv2d(x, self.weight)
        return self.bias_add(y, self.bias) if self.has_bias else y


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise k x k convolution without bias: an ``nn.Conv2d`` (same parameter, same padding as
    ``_conv``) that, after ``set_fused(True)``, runs the fused CPU kernel of ``src.kernels`` for 3x3 float32
    inputs (stride 1 or 2) where it is available (MindSpore's grouped convolution was ~15 % of a CoAtNet-0
    train step)."""

    def __init__(self, channels: int, k: int, stride: int = 1):
        super().__init__(channels, channels, k, stride=stride, group=channels, has_bias=False, **_padding(k, stride))
        self.fused_stride = stride if k == 3 and stride in (1, 2) else None  # what the kernel covers
        self.fused = None

    def set_fused(self, on: bool) -> None:
        """The fused kernel where it applies (``on``: see ``src.kernels.use_fused_kernels``), else MindSpore's ops."""
        self.fused = kernels.depthwise_conv3x3(self.fused_stride) if on and self.fused_stride else None

    def construct(self, x):
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x, self.weight)
        return self.conv2d(x, self.weight)


class Conv3x3(nn.Conv2d):
    """Dense 3x3 convolution without bias (the stem's): an ``nn.Conv2d`` (same parameter; padding one each
    side as ``_conv``, or MindSpore's ``pad_mode="same"``) that, after ``set_fused(True)``, runs for float32
    inputs as the im2col kernel of ``src.kernels`` followed by a 1x1 convolution: MindSpore 2.10's oneDNN
    runs a dense 3x3 convolution on its reference path on CPUs that allow AVX-512 (seconds per call), and
    its 1x1 convolution on the fast one."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, same: bool = False):
        padding = {"pad_mode": "same"} if same else _padding(3, stride)
        super().__init__(in_chs, out_chs, 3, stride=stride, has_bias=False, **padding)
        self.pads_by_parity = same and stride == 2  # "same" pads (0, 1) on an even size, (1, 1) on an odd one
        self.conv_stride = stride
        self.fused = None  # im2col ops by (H odd, W odd), or None: MindSpore's convolution
        self.conv1x1 = ops.Conv2D(out_chs, 1)

    def set_fused(self, on: bool) -> None:
        """The im2col kernel where it applies (``on``: see ``src.kernels.use_fused_kernels``), else MindSpore's op."""
        self.fused = None
        if on:
            pads = [(h, w) for h in (0, 1) for w in (0, 1)] if self.pads_by_parity else [(1, 1)] * 4
            fused = tuple(kernels.im2col3x3(self.conv_stride, top, left) for top, left in pads)
            self.fused = fused if all(op is not None for op in fused) else None

    def construct(self, x):
        if self.fused is not None and x.dtype == ms.float32:
            n, c, h, w = x.shape
            col = self.fused[2 * (h % 2) + w % 2](x)
            return self.conv1x1(col, self.weight.reshape(self.out_channels, 9 * c, 1, 1))
        return self.conv2d(x, self.weight)


class DropPath(nn.Cell):
    """Stochastic depth (Huang et al. 2016): drop the residual branch per sample while training.

    ``noise`` is the network's ``drop_path_noise`` [num_drop_paths, B] of uniform [0, 1) numbers, row
    ``index`` this cell's: given by the caller, the masks are a pure function of what it passes (the
    trainer draws them from (seed, rank, step), so a resumed run replays them; MindSpore 2.10's random
    ops keep their state inside the kernel, where no checkpoint reaches, and its generator-driven ones
    have no CPU kernel). Without it the cell draws its own with ``ops.rand``."""

    def __init__(self, drop_prob: float, index: int = 0):
        super().__init__()
        self.keep_prob = 1.0 - drop_prob
        self.index = index

    def construct(self, x, noise=None):
        if not self.training or self.keep_prob >= 1.0:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        u = ops.rand(shape, dtype=x.dtype) if noise is None else noise[self.index].reshape(shape).astype(x.dtype)
        return x / self.keep_prob * ops.floor(self.keep_prob + u)


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2, 2)`` that, after ``set_fused(True)``, runs the fused CPU kernel of ``src.kernels`` on
    float32 inputs (forward and gradient), else MindSpore's pooling."""

    def __init__(self):
        super().__init__(kernel_size=2, stride=2)
        self.fused = None

    def set_fused(self, on: bool) -> None:
        """The fused kernel where it applies (``on``: see ``src.kernels.use_fused_kernels``), else MindSpore's op."""
        self.fused = kernels.avg_pool2x2() if on else None

    def construct(self, x):
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x)
        return self.avg_pool(x)


def _pool2x2(kind: str) -> nn.Cell:
    if kind == "avg":
        return AvgPool2x2()
    if kind == "max":
        # The original's 'same' 2x2 max pool (ExtractImagePatches + ReduceMax): no padding on the even
        # sizes a CoAtNet sees, so this is the same operation with a CPU kernel.
        return nn.MaxPool2d(kernel_size=2, stride=2)
    raise ValueError(f"unknown pool type '{kind}'")


class Downsample2d(nn.Cell):
    """2x2 pool (stride 2), then a 1x1 conv when the width changes or ``project`` (paper Eq. 5 shortcut)."""

    def __init__(self, dim: int, dim_out: int, bias: bool = True, pool: str = "avg", project: bool = False):
        super().__init__()
        self.pool = _pool2x2(pool)
        self.expand = _conv1x1(dim, dim_out, bias) if dim != dim_out or project else None

    def construct(self, x):
        x = self.pool(x)
        if self.expand is not None:
            x = self.expand(x)
        return x


def spatial_mean(x):
    """Mean over H and W of an NCHW tensor, keeping the dims: (B, C, 1, 1).

    A matrix-vector product, not ReduceMean: MindSpore 2.10's CPU ReduceMean over (2, 3) and the
    Tile of its gradient took ~7x longer than GEMV on the SE inputs of CoAtNet-0."""
    b, c, h, w = x.shape
    weights = ops.full((h * w, 1), 1.0 / (h * w), dtype=x.dtype)
    return ops.matmul(x.reshape(b * c, h * w), weights).reshape(b, c, 1, 1)


class ChannelGate(nn.Cell):
    """``x * gate`` for a (B, C, 1, 1) gate. After ``set_fused(True)``, on float32 inputs, forward and
    backward are fused CPU kernels (``src.kernels.channel_gate`` and ``channel_gate_grad``); otherwise the
    gradient sums ``dout * x`` over H, W with a matrix-vector product (the broadcast-multiply gradient
    MindSpore derives is a slow CPU ReduceSum)."""

    def __init__(self):
        super().__init__()
        self.fused = self.fused_grad = None

    def set_fused(self, on: bool) -> None:
        """The fused kernels where they apply (``on``: see ``src.kernels.use_fused_kernels``), else MindSpore's ops."""
        forward = kernels.channel_gate() if on else None
        grad = kernels.channel_gate_grad() if forward is not None else None
        self.fused, self.fused_grad = (forward, grad) if grad is not None else (None, None)

    def construct(self, x, gate):
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x, gate)
        return x * gate

    def bprop(self, x, gate, out, dout):
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused_grad(dout, x, gate)
        b, c, h, w = x.shape
        ones = ops.ones((h * w, 1), x.dtype)
        dgate = ops.matmul((dout * x).reshape(b * c, h * w), ones).reshape(b, c, 1, 1)
        return dout * gate, dgate


class Softmax(nn.Cell):
    """Softmax over the last axis whose gradient, after ``set_fused(True)``, is one fused CPU pass on float32
    (``src.kernels.softmax_grad``), else ``y * (dy - sum(dy * y))``."""

    def __init__(self):
        super().__init__()
        self.fused = None

    def set_fused(self, on: bool) -> None:
        """The fused kernel where it applies (``on``: see ``src.kernels.use_fused_kernels``), else MindSpore's ops."""
        self.fused = kernels.softmax_grad() if on else None

    def construct(self, x):
        return ops.softmax(x, axis=-1)

    def bprop(self, x, out, dout):
        if self.fused is not None and out.dtype == ms.float32:
            return (self.fused(out, dout),)
        return (out * (dout - (dout * out).sum(axis=-1, keepdims=True)),)


class ConvMlp(nn.Cell):
    """1x1 conv - act - 1x1 conv: the transformer block's MLP, and the bottleneck of squeeze-and-excitation."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = Conv1x1(dim, hidden)
        self.act = _act(act)
        self.fc2 = Conv1x1(hidden, dim)

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SqueezeExcite(ConvMlp):
    """Squeeze-and-excitation: the channel means through ConvMlp's bottleneck, then a sigmoid gate."""

    def __init__(self, channels: int, rd_channels: int, act: str):
        super().__init__(channels, rd_channels, act)
        self.sigmoid = nn.Sigmoid()  # a cell: mixed precision can keep it in float32 (src/precision.py)
        self.gate = ChannelGate()

    def construct(self, x):
        s = self.fc2(self.act(self.fc1(spatial_mean(x))))
        return self.gate(x, self.sigmoid(s))


class MBConvBlock(nn.Cell):
    """Pre-norm inverted bottleneck: BN - 1x1 expand - 3x3 depthwise - SE - 1x1 project (Sec. 2.1)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, cfg: ConvCfg, drop_path: float,
                 drop_path_index: int = 0):
        super().__init__()
        if cfg.stride_mode not in ("dw", "pool", "expand"):
            raise ValueError(f"unknown stride_mode '{cfg.stride_mode}'")
        # make_divisible leaves the even widths of every variant unchanged (the original: int(in * 4)).
        mid_chs = make_divisible((out_chs if cfg.expand_output else in_chs) * cfg.expand_ratio)
        self.shortcut = Downsample2d(in_chs, out_chs, bias=cfg.output_bias, pool=cfg.pool_type,
                                     project=cfg.always_project) if stride == 2 else None
        pool_stride = stride if cfg.stride_mode == "pool" else 1
        dw_stride = stride if cfg.stride_mode == "dw" else 1
        expand_stride = stride if cfg.stride_mode == "expand" else 1
        norm = dict(eps=cfg.norm_eps, momentum=cfg.norm_momentum)
        self.pre_norm = BatchNormAct2d(in_chs, cfg.act if cfg.pre_norm_act else None, **norm)
        self.down = _pool2x2(cfg.pool_type) if pool_stride > 1 else None
        self.conv1_1x1 = _conv(in_chs, mid_chs, 1, stride=expand_stride, bias=False)
        self.norm1 = BatchNormAct2d(mid_chs, cfg.act, **norm)
        self.conv2_kxk = DepthwiseConv2d(mid_chs, 3, stride=dw_stride)
        if cfg.se_from_input:
            rd = int(cfg.se_ratio * in_chs)
        else:
            rd = int(cfg.se_ratio * (out_chs if cfg.expand_output else mid_chs))
        se = SqueezeExcite(mid_chs, rd, cfg.se_act)
        self.se_early = se if cfg.se_early else None
        self.norm2 = BatchNormAct2d(mid_chs, cfg.act, **norm)
        self.se = None if cfg.se_early else se
        self.conv3_1x1 = _conv(mid_chs, out_chs, 1, bias=cfg.output_bias)
        self.drop_path = DropPath(drop_path, drop_path_index) if drop_path > 0 else None
        self.norm1_dw = None  # norm1 -> conv2_kxk as one training kernel (set_fused)
        self.norm_dw_min_area = 56 * 56  # ... where the depthwise output plane is at least this large

    def set_fused(self, on: bool) -> None:
        """In training, norm1 (BatchNorm + GELU) and the 3x3 depthwise conv2_kxk as one fused CPU kernel
        (``on``: see ``src.kernels.use_fused_kernels``) that never stores the activation between them (CoAtNet-0
        train step: ~0.3 GB less memory); evaluation keeps the two cells' own kernels."""
        stride = self.conv2_kxk.fused_stride
        fusable = on and self.norm1.fused_act and stride is not None
        self.norm1_dw = kernels.batchnorm_depthwise(self.norm1.act_name, stride) if fusable else None

    def _fuse_norm_dw(self, shape) -> bool:
        # The fused kernel works channel by channel; below a 56 x 56 output plane its short strided runs
        # cost more than the traffic it saves (CoAtNet-0, batch 8: 112 -> 56 stride 2 forward + backward
        # 50.8 -> 43.1 ms, 56 x 56 stride 1 18.8 -> 18.2, 56 -> 28 stride 2 27.4 -> 37.5).
        s = self.conv2_kxk.fused_stride
        return ((shape[2] - 1) // s + 1) * ((shape[3] - 1) // s + 1) >= self.norm_dw_min_area

    def construct(self, x, drop_path_noise=None):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        x = self.pre_norm(x)
        if self.down is not None:
            x = self.down(x)
        x = self.conv1_1x1(x)
        if self.norm1_dw is not None and self.training and x.dtype == ms.float32 and self._fuse_norm_dw(x.shape):
            x = self.norm1.train_with(self.norm1_dw, x, self.conv2_kxk.weight)
        else:
            x = self.conv2_kxk(self.norm1(x))
        if self.se_early is not None:
            x = self.se_early(x)
        x = self.norm2(x)
        if self.se is not None:
            x = self.se(x)
        x = self.conv3_1x1(x)
        if self.drop_path is not None:
            x = self.drop_path(x, drop_path_noise)
        return x + shortcut


def rel_pos_index(window: tuple[int, int]) -> np.ndarray:
    """Index into the (2H-1)(2W-1) bias table for every (query, key) pair of an H x W grid."""
    h, w = window
    coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    return (rel[:, :, 0] * (2 * w - 1) + rel[:, :, 1]).astype(np.int32)


class RelPosBias(nn.Cell):
    """Per-head relative position bias (paper Eq. 3): a learned (2H-1)(2W-1) x heads table,
    gathered once per forward by a constant index into an (heads, HW, HW) bias."""

    def __init__(self, window: tuple[int, int], num_heads: int, resize_mode: str = "bicubic"):
        super().__init__()
        self.window = tuple(window)
        self.resize_mode = resize_mode  # how a table of another window is fitted to this one
        self.num_heads = num_heads
        n = (2 * window[0] - 1) * (2 * window[1] - 1)
        self.relative_position_bias_table = Parameter(
            init.initializer(init.TruncatedNormal(0.02), (n, num_heads), ms.float32),
            name="relative_position_bias_table")
        area = window[0] * window[1]
        self.index = Tensor(rel_pos_index(window).reshape(-1), ms.int32)
        self.bias_shape = (num_heads, area, area)

    def construct(self):
        # Transpose the small table, not the gathered (heads, HW, HW) bias.
        bias = ops.gather(self.relative_position_bias_table.transpose(1, 0), self.index, 1)
        return bias.reshape(self.bias_shape).expand_dims(0)


class BatchBroadcastAdd(nn.Cell):
    """``x + bias`` for a bias broadcast over the batch axis (shape (1, ...)), whose gradient sums
    over the batch with a matrix-vector product (MindSpore's derived ReduceSum is slow on CPU)."""

    def construct(self, x, bias):
        return x + bias

    def bprop(self, x, bias, out, dout):
        ones = ops.ones((1, dout.shape[0]), dout.dtype)
        return dout, ops.matmul(ones, dout.reshape(dout.shape[0], -1)).reshape(bias.shape)


class Attention2d(nn.Cell):
    """Multi-head relative self-attention over the H*W positions of an NCHW map (Sec. 2.2)."""

    def __init__(self, dim: int, dim_out: int, window: tuple[int, int], cfg: TransformerCfg):
        super().__init__()
        dim_attn = dim_out if cfg.expand_first else dim
        self.num_heads = dim_attn // cfg.dim_head
        self.dim_head = cfg.dim_head
        # The original scales q and k each by dim_head^-0.25 (smaller float16 products); timm q by ^-0.5.
        self.qk_scale_split = cfg.qk_scale_split
        self.scale = cfg.dim_head ** (-0.25 if cfg.qk_scale_split else -0.5)
        self.qkv = Conv1x1(dim, dim_attn * 3)
        self.rel_pos = RelPosBias(window, self.num_heads, cfg.rel_pos_resize)
        self.proj = Conv1x1(dim_attn, dim_out)
        # Transposed operands via the matmul flags: no (B, heads, N, N) transposes, forward or backward.
        self.matmul_tn = ops.BatchMatMul(transpose_a=True)
        self.matmul_nt = ops.BatchMatMul(transpose_b=True)
        self.add_bias = BatchBroadcastAdd()
        self.softmax = Softmax()
        self.fused = None

    def set_fused(self, on: bool) -> None:
        """The bias add and the softmax as one fused CPU kernel of ``src.kernels`` (``on``: see
        ``src.kernels.use_fused_kernels``) for float32 scores (no mixed precision), else the two cells."""
        self.fused = kernels.bias_softmax() if on else None

    def construct(self, x):
        b, _, h, w = x.shape
        # Channel layout of qkv is head-major: (head, [q|k|v], dim_head), as timm's head_first.
        qkv = self.qkv(x).reshape(b, self.num_heads, self.dim_head * 3, h * w)
        q, k, v = ops.split(qkv, self.dim_head, axis=2)
        if self.qk_scale_split:
            k = k * self.scale
        attn = self.matmul_tn(q * self.scale, k)  # q^T k: B, heads, N, N
        if self.fused is not None and attn.dtype == ms.float32:
            attn = self.fused(attn, self.rel_pos()).astype(v.dtype)
        else:
            # Softmax and the bias add in float32: safe under float16 mixed precision.
            attn = self.add_bias(attn.astype(ms.float32), self.rel_pos())
            attn = self.softmax(attn).astype(v.dtype)
        out = self.matmul_nt(v, attn).reshape(b, -1, h, w)  # v attn^T
        return self.proj(out)


class LayerScale2d(nn.Cell):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = Parameter(Tensor(np.full((dim,), init_values, np.float32)), name="gamma")

    def construct(self, x):
        return x * self.gamma.reshape(1, -1, 1, 1).astype(x.dtype)


class PreNormDown(nn.Cell):
    """Norm then 2x2 pool: the pre-norm of a downsampling transformer block (paper Eq. 5)."""

    def __init__(self, norm: nn.Cell, dim: int, pool: str = "avg"):
        super().__init__()
        self.norm = norm
        self.down = Downsample2d(dim, dim, pool=pool)

    def construct(self, x):
        return self.down(self.norm(x))


class TransformerBlock2d(nn.Cell):
    """Pre-norm relative-attention block + MLP, NCHW layout (no token reshapes between blocks)."""

    def __init__(self, dim: int, dim_out: int, stride: int, window: tuple[int, int], cfg: TransformerCfg,
                 drop_path: float, drop_path_index: int = 0):
        super().__init__()
        if stride == 2:
            self.shortcut = Downsample2d(dim, dim_out, bias=cfg.shortcut_bias, pool=cfg.pool_type,
                                         project=cfg.always_project)
            self.norm1 = PreNormDown(_norm2d(cfg.norm, dim, cfg.norm_eps), dim, cfg.pool_type)
        else:
            if dim != dim_out:
                raise ValueError(f"a stride-1 transformer block needs dim == dim_out, got {dim} -> {dim_out}")
            self.shortcut = None
            self.norm1 = _norm2d(cfg.norm, dim, cfg.norm_eps)
        self.attn = Attention2d(dim, dim_out, window, cfg)
        self.ls1 = LayerScale2d(dim_out, cfg.init_values) if cfg.init_values else None
        self.drop_path1 = DropPath(drop_path, drop_path_index) if drop_path > 0 else None
        self.norm2 = _norm2d(cfg.norm, dim_out, cfg.norm_eps)
        self.mlp = ConvMlp(dim_out, int(dim_out * cfg.expand_ratio), cfg.act)
        self.ls2 = LayerScale2d(dim_out, cfg.init_values) if cfg.init_values else None
        self.drop_path2 = DropPath(drop_path, drop_path_index + 1) if drop_path > 0 else None

    def construct(self, x, drop_path_noise=None):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        y = self.attn(self.norm1(x))
        if self.ls1 is not None:
            y = self.ls1(y)
        if self.drop_path1 is not None:
            y = self.drop_path1(y, drop_path_noise)
        x = shortcut + y
        y = self.mlp(self.norm2(x))
        if self.ls2 is not None:
            y = self.ls2(y)
        if self.drop_path2 is not None:
            y = self.drop_path2(y, drop_path_noise)
        return x + y


class Stem(nn.Cell):
    """S0: 3x3 conv stride 2 - BN - act - 3x3 conv (paper Table 3)."""

    def __init__(self, in_chs: int, widths: tuple[int, int], cfg: ConvCfg):
        super().__init__()
        if cfg.stem_padding not in ("same", "symmetric"):
            raise ValueError(f"unknown stem_padding '{cfg.stem_padding}'")
        # "same": MindSpore's default, as the original: (0, 1) at stride 2
        self.conv1 = Conv3x3(in_chs, widths[0], stride=2, same=cfg.stem_padding == "same")
        self.norm1 = BatchNormAct2d(widths[0], cfg.act, cfg.norm_eps, cfg.norm_momentum)
        self.conv2 = Conv3x3(widths[0], widths[1])

    def construct(self, x):
        return self.conv2(self.norm1(self.conv1(x)))


class Stage(nn.Cell):
    def __init__(self, blocks: list[nn.Cell]):
        super().__init__()
        self.blocks = nn.CellList(blocks)

    def construct(self, x, drop_path_noise=None):
        for block in self.blocks:
            x = block(x, drop_path_noise)
        return x


class NormMlpHead(nn.Cell):
    """Paper head: global average pool - LayerNorm - Dense - Tanh - dropout - Dense."""

    def __init__(self, dim: int, hidden: int, num_classes: int, drop_rate: float, norm: nn.Cell):
        super().__init__()
        self.norm = norm
        self.pre_logits = PreLogits(dim, hidden)
        self.drop = nn.Dropout(p=drop_rate) if drop_rate > 0 else None
        self.fc = nn.Dense(hidden, num_classes)

    def construct(self, x):
        x = self.norm(spatial_mean(x)).reshape(x.shape[0], -1)
        x = self.pre_logits(x)
        if self.drop is not None:
            x = self.drop(x)
        return self.fc(x)


class PreLogits(nn.Cell):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc = nn.Dense(dim, hidden)
        self.act = nn.Tanh()

    def construct(self, x):
        return self.act(self.fc(x))


class ClassifierHead(nn.Cell):
    """timm 'rw' head: global average pool - dropout - Dense (the final norm sits before it)."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float):
        super().__init__()
        self.drop = nn.Dropout(p=drop_rate) if drop_rate > 0 else None
        self.fc = nn.Dense(dim, num_classes)

    def construct(self, x):
        x = spatial_mean(x).reshape(x.shape[0], -1)
        if self.drop is not None:
            x = self.drop(x)
        return self.fc(x)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
def _to_2tuple(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


class CoAtNet(nn.Cell):
    def __init__(self, cfg: CoAtNetCfg, num_classes: int = 1000, image_size=224, in_chans: int = 3,
                 drop_path_rate: float | None = None, drop_rate: float = 0.0):
        super().__init__()
        image_size = _to_2tuple(image_size)
        if image_size[0] % 32 or image_size[1] % 32:
            raise ValueError(f"image_size must be divisible by 32, got {image_size[0]}x{image_size[1]}")
        if drop_path_rate is None:
            drop_path_rate = cfg.drop_path_rate
        self.cfg = cfg
        self.num_classes = num_classes
        self.image_size = image_size
        self.drop_path_rate = drop_path_rate
        self.stem = Stem(in_chans, cfg.stem_width, cfg.conv)
        # Stochastic depth grows linearly with the block index over the whole network (paper
        # Appendix A.2; the original's np.linspace(0, rate, sum(depths))).
        total = sum(cfg.depths)
        rates = np.linspace(0.0, drop_path_rate, total).tolist() if total > 1 else [drop_path_rate]
        stages, in_chs, feat, start = [], cfg.stem_width[1], (image_size[0] // 2, image_size[1] // 2), 0
        drop_paths = 0  # DropPath cells so far: each owns one row of drop_path_noise
        stage_cfgs = zip(cfg.depths, cfg.embed_dim, cfg.block_types, strict=True)
        for i, (depth, out_chs, kind) in enumerate(stage_cfgs):
            feat = ((feat[0] - 1) // 2 + 1, (feat[1] - 1) // 2 + 1)
            blocks = []
            for j in range(depth):
                stride = 2 if j == 0 else 1
                dp = rates[start + j]
                if kind == "C":
                    blocks.append(MBConvBlock(in_chs, out_chs, stride, cfg.conv, dp, drop_paths))
                    drop_paths += 1 if dp > 0 else 0
                elif kind == "T":
                    blocks.append(TransformerBlock2d(in_chs, out_chs, stride, feat, cfg.transformer, dp, drop_paths))
                    drop_paths += 2 if dp > 0 else 0
                else:
                    raise ValueError(f"stage {i}: unknown block type '{kind}'")
                in_chs = out_chs
            start += depth
            stages.append(Stage(blocks))
        self.stages = nn.CellList(stages)
        #: rows of the ``drop_path_noise`` a training forward takes (0: no stochastic depth)
        self.num_drop_paths = drop_paths
        self.num_features = in_chs
        t = cfg.transformer
        if cfg.head_hidden_size:
            self.norm = None
            self.head = NormMlpHead(in_chs, cfg.head_hidden_size, num_classes, drop_rate,
                                    _norm2d(t.norm, in_chs, t.norm_eps))
        else:
            self.norm = _norm2d(t.norm, in_chs, t.norm_eps)
            self.head = ClassifierHead(in_chs, num_classes, drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        if self.cfg.init not in ("timm", "normal"):
            raise ValueError(f"unknown init scheme '{self.cfg.init}'")
        parts = [(self.stem, False), (self.head, True)]
        parts += [(block, isinstance(block, TransformerBlock2d)) for stage in self.stages for block in stage.blocks]
        for part, transformer in parts:
            for _, cell in part.cells_and_names():
                _init_cell(cell, self.cfg.init, transformer)

    def forward_features(self, x, drop_path_noise=None):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x, drop_path_noise)
        if self.norm is not None:
            x = self.norm(x)
        return x

    def construct(self, x, drop_path_noise=None):
        """Logits of ``x``; ``drop_path_noise`` [num_drop_paths, B] (training only, see ``DropPath``)."""
        return self.head(self.forward_features(x, drop_path_noise))


def _init_cell(cell: nn.Cell, scheme: str, transformer: bool) -> None:
    """Initialise the kernels of one conv/dense cell (and a relative-position table) by ``scheme``.

    'timm': convs outside the transformer blocks as EfficientNet (normal, fan-out), transformer convs and
    dense layers xavier-uniform ('vit_eff'), biases zero, tables TruncatedNormal(0.02) (set at creation).
    'normal': what the original got from MindSpore 1.6's defaults: N(0, 0.01) for every conv and dense
    kernel, zero biases, TruncatedNormal(0.01) tables."""
    if isinstance(cell, RelPosBias):
        if scheme == "normal":
            table = cell.relative_position_bias_table
            table.set_data(init.initializer(init.TruncatedNormal(0.01), table.shape, ms.float32))
        return
    if not isinstance(cell, (nn.Conv2d, nn.Dense)):
        return
    if scheme == "normal":
        weight_init = init.Normal(0.01)
    elif isinstance(cell, nn.Dense) or transformer:
        weight_init = init.XavierUniform()
    else:
        k = cell.kernel_size
        weight_init = init.Normal(math.sqrt(2.0 / (k[0] * k[1] * cell.out_channels // cell.group)))
    cell.weight.set_data(init.initializer(weight_init, cell.weight.shape))
    if cell.has_bias:
        cell.bias.set_data(init.initializer("zeros", cell.bias.shape))


def create_model(name: str, num_classes: int = 1000, image_size=224, drop_path_rate: float | None = None,
                 **kw) -> CoAtNet:
    """Build a CoAtNet variant by name (see ``list_models()``). ``drop_path_rate`` None: the variant's own
    rate. ``kw`` goes to :class:`CoAtNet` (``drop_rate``, ``in_chans``) or overrides fields of the
    variant's :class:`CoAtNetCfg`."""
    if name not in MODEL_CFGS:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(list_models())}")
    cfg = MODEL_CFGS[name]
    cfg_fields = {k: kw.pop(k) for k in list(kw) if k in CoAtNetCfg.__dataclass_fields__}
    if cfg_fields:
        cfg = replace(cfg, **cfg_fields)
    return CoAtNet(cfg, num_classes=num_classes, image_size=image_size, drop_path_rate=drop_path_rate, **kw)


# --------------------------------------------------------------------------------------------------
# Relative-position tables at a new resolution
# --------------------------------------------------------------------------------------------------
def _cubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of 1-D bicubic interpolation, a = -0.75, half-pixel centres, edge clamp
    (the kernel of PyTorch's ``interpolate(mode='bicubic', align_corners=False)``)."""
    a = -0.75

    def k(t):
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return 0.0

    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        x0 = math.floor(src)
        t = src - x0
        for off in (-1, 0, 1, 2):
            m[i, min(max(x0 + off, 0), in_size - 1)] += k(off - t)
    return m


def _linear_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of 1-D linear interpolation with align_corners=True (MindSpore's
    ``ResizeBilinear(size, align_corners=True)``, used by the original's fine-tuning)."""
    m = np.zeros((out_size, in_size), np.float64)
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    for i in range(out_size):
        src = i * scale
        x0 = min(int(math.floor(src)), in_size - 1)
        x1 = min(x0 + 1, in_size - 1)
        t = src - x0
        m[i, x0] += 1.0 - t
        m[i, x1] += t
    return m


_RESIZE_WEIGHTS = {"bicubic": _cubic_weights, "bilinear": _linear_weights}


def resize_rel_pos_bias_table(table: np.ndarray, new_window: tuple[int, int],
                              old_window: tuple[int, int] | None = None, mode: str = "bicubic") -> np.ndarray:
    """Resize a ((2H-1)(2W-1), heads) bias table to a new window by interpolating each head on the
    (2H-1) x (2W-1) grid of relative offsets (used to fine-tune 224 -> 384): ``mode`` 'bicubic'
    (timm's) or 'bilinear' (align_corners=True, the original's)."""
    if mode not in _RESIZE_WEIGHTS:
        raise ValueError(f"unknown table resize mode '{mode}'; expected one of {', '.join(_RESIZE_WEIGHTS)}")
    table = np.asarray(table, np.float32)
    n, heads = table.shape
    if old_window is None:
        side = int(round(math.sqrt(n)))
        if side * side != n:
            raise ValueError(f"cannot infer the window of a bias table with {n} rows; pass old_window")
        src = (side, side)
    else:
        src = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    dst = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if src == dst:
        return table
    grid = table.reshape(src[0], src[1], heads).transpose(2, 0, 1)
    weights = _RESIZE_WEIGHTS[mode]
    wy, wx = weights(src[0], dst[0]), weights(src[1], dst[1])
    out = np.einsum("ij,hjk,lk->hil", wy, grid.astype(np.float64), wx)
    return out.transpose(1, 2, 0).reshape(-1, heads).astype(np.float32)


def resize_rel_pos_tables(state: dict, net: CoAtNet) -> dict:
    """Return ``state`` (name -> array-like) with every relative-position table resized to the
    window of the matching layer in ``net`` (e.g. a 224 checkpoint for a 384 model)."""
    tables = {name: cell for name, cell in net.cells_and_names() if isinstance(cell, RelPosBias)}
    out = dict(state)
    for key, value in state.items():
        if key.endswith("relative_position_bias_table"):
            owner = key[: -len(".relative_position_bias_table")]
            if owner in tables:
                arr = value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
                w = tables[owner].window
                if arr.shape[0] != (2 * w[0] - 1) * (2 * w[1] - 1):  # same window: nothing to resize
                    out[key] = resize_rel_pos_bias_table(arr, w, mode=tables[owner].resize_mode)
    return out
