"""Training step as one compiled graph: dynamic loss scale, gradient clipping, AdamW and EMA.

Step order (as the original MindSpore CoAtNet): forward + soft-target loss -> scaled backward ->
all-reduce (data parallel) -> global norm (of the scaled gradients, then unscaled) -> overflow check ->
unscale and clip by global norm (one multiply) -> AdamWeightDecay -> EMA. On overflow the update
(optimizer and EMA) is skipped and the loss scale shrinks by ``scale_factor``; after ``scale_window``
good steps in a row it grows by ``scale_factor``.

MindSpore's ``nn.TrainOneStepWithLossScaleCell`` cannot be used: on CPU its overflow check needs
NPUGetFloatStatusV2 ("Unsupported op [NPUGetFloatStatusV2] on CPU"). The check here is that the
global gradient norm (needed for clipping anyway) is finite: an inf or NaN anywhere makes it inf or
NaN. It is taken over the scaled gradients, so it also flags finite scaled gradients whose norm
overflows float32 (> 1.8e19 before the sum of squares overflows; at the initial scale 2^24 an unscaled
norm above ~1e12), which no useful step has and which dynamic loss scaling exists to catch. Unlike
``ms.amp.all_finite`` (an IsFinite + ReduceAll per tensor, ~3 % of a CoAtNet-0 CPU step) it costs one
scalar op, on every device. On CPU the sum of the squares of all gradients is one fused kernel
(``src.kernels.sum_of_squares``; ~30 ms of a CoAtNet-0 step as one MatMul per gradient); without a compiler
each gradient's is a 1 x n by n x 1 MatMul: MindSpore's CPU ReduceSum over all axes of a weight tensor ran
at a quarter of that speed (~0.1 s of a CoAtNet-0 step). Elsewhere it stays a square-and-sum (an fp32
MatMul may run in fp16 on Ascend, where squared gradients can overflow).

Float16 training (``src/precision.py``) leaves the parameters, so their gradients, in float32; a float16
gradient would be squared and summed in float32 all the same. The first steps of a float16 run overflow
at the initial scale 2^24: each is skipped with the scale halved until the gradients are finite.
"""
from __future__ import annotations

import ctypes
import gc

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from src import kernels
from src.train_state import state_name

__all__ = ["AdamWeightDecay", "SoftTargetCrossEntropy", "TrainStep", "adam_weight_decay", "drop_path_noise"]

_DROP_PATH_STREAM = 0x0D20  # keeps these draws apart from the data pipeline's (seed, shard, stream) generators


def drop_path_noise(seed: int, rank: int, step: int, rows: int, batch: int) -> Tensor | None:
    """The stochastic-depth noise of training step ``step`` (0-based, global) on ``rank``: uniform
    [0, 1) float32 [rows, batch], a pure function of its arguments, so a resumed run draws exactly what
    the uninterrupted one drew (``rows`` = the model's ``num_drop_paths``; 0: None)."""
    if rows == 0:
        return None
    rng = np.random.default_rng([seed, rank, step, _DROP_PATH_STREAM])
    return Tensor(rng.random((rows, batch), dtype=np.float32))

_hyper_map = ops.HyperMap()


class SoftTargetCrossEntropy(nn.Cell):
    """Cross-entropy against soft targets (MixUp + label smoothing already folded in by the data
    pipeline), computed in float32."""

    def construct(self, logits, target):
        logp = ops.log_softmax(logits.astype(ms.float32), axis=-1)
        return -(target.astype(ms.float32) * logp).sum(axis=-1).mean()


class _NetWithLoss(nn.Cell):
    def __init__(self, network: nn.Cell, loss_fn: nn.Cell):
        super().__init__(auto_prefix=False)
        self.network = network
        self.loss_fn = loss_fn

    def construct(self, images, target, drop_path_noise=None):
        if drop_path_noise is None:  # resolved at compile time; any network taking one input works
            return self.loss_fn(self.network(images), target)
        return self.loss_fn(self.network(images, drop_path_noise), target)


class _ScaledLoss(nn.Cell):
    """The loss times the loss scale (what is differentiated), and the loss itself as an auxiliary output."""

    def __init__(self, net_with_loss: nn.Cell):
        super().__init__(auto_prefix=False)
        self.net_with_loss = net_with_loss

    def construct(self, images, target, drop_path_noise, scale):
        loss = self.net_with_loss(images, target, drop_path_noise)
        return loss * scale.astype(loss.dtype), loss


def _scale_grads(factor, grad):
    return grad * factor.astype(grad.dtype)


def _sum_of_squares(grad, as_matmul: bool):
    g = grad.astype(ms.float32)
    if as_matmul:
        return ops.matmul(g.reshape(1, -1), g.reshape(-1, 1)).reshape(())
    return ops.square(g).sum()


def _ema_update(step, weight, ema, param):
    # ema - (1 - decay) (ema - param), in place: two passes over the tensors fewer than assigning
    # decay * ema + (1 - decay) * param, and closer to it in float64 (CoAtNet-0 on CPU: 41 -> 25-33 ms)
    return step(ema, weight, ema - param.astype(ema.dtype))


_adamw_update = ops.MultitypeFuncGraph("adamw_update")


@_adamw_update.register("Function", "Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                        "Tensor", "Tensor", "Tensor", "Bool", "Bool")
def _adamw_by_adam(adam, decay, beta1, beta2, eps, no_bias_correction, lr, weight_decay, param, m, v, grad,
                   decay_flag, optim_filter):
    if optim_filter:
        if decay_flag:  # decoupled decay first, from the old weights: p -= lr * wd * p
            param = ops.depend(param, decay(param, lr * weight_decay, param))
        adam(param, m, v, no_bias_correction, no_bias_correction, lr, beta1, beta2, eps, grad.astype(param.dtype))
    return True


class AdamWeightDecay(nn.AdamWeightDecay):
    """``nn.AdamWeightDecay`` (same parameters, moments ``adam_m.``/``adam_v.``, groups and lr schedule: its
    checkpoints are interchangeable) whose update runs as two MindSpore kernels that are fast on CPU:
    the decoupled decay ``p -= lr * wd * p`` (ApplyGradientDescent) and then the Adam kernel with its bias
    correction switched off (beta1^t = beta2^t = 0 make its step size lr). That is AdamWeightDecay's update:
    m and v come out bit-identical, p within float32 rounding of it. MindSpore 2.10's CPU AdamWeightDecay
    kernel streams at ~11 GB/s: 68 ms for 27 M parameters (CoAtNet-0) against 23 ms for the two kernels
    here (tests/test_train_step.py holds them equal). Built by ``adam_weight_decay`` on CPU only."""

    def __init__(self, params, learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0):
        super().__init__(params, learning_rate, beta1, beta2, eps, weight_decay)
        self.adam = ops.operations.Adam()
        self.decay = ops.operations.ApplyGradientDescent()
        self.no_bias_correction = Tensor(np.zeros(1, np.float32))

    def construct(self, gradients):
        weight_decay = self.get_weight_decay()
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        if self.is_group:
            if self.is_group_lr:
                return self.hyper_map(ops.partial(_adamw_update, self.adam, self.decay, self.beta1, self.beta2,
                                                  self.eps, self.no_bias_correction),
                                      lr, weight_decay, self._parameters, self.moments1, self.moments2, gradients,
                                      self.decay_flags, self.optim_filter)
            return self.hyper_map(ops.partial(_adamw_update, self.adam, self.decay, self.beta1, self.beta2, self.eps,
                                              self.no_bias_correction, lr),
                                  weight_decay, self._parameters, self.moments1, self.moments2, gradients,
                                  self.decay_flags, self.optim_filter)
        return self.hyper_map(ops.partial(_adamw_update, self.adam, self.decay, self.beta1, self.beta2, self.eps,
                                          self.no_bias_correction, lr, weight_decay),
                              self._parameters, self.moments1, self.moments2, gradients, self.decay_flags,
                              self.optim_filter)


def adam_weight_decay(params, learning_rate, beta1: float, beta2: float, eps: float) -> nn.AdamWeightDecay:
    """The AdamW of the train step: ``AdamWeightDecay`` above on CPU, MindSpore's own elsewhere (where its
    fused kernel is the fast one)."""
    cls = AdamWeightDecay if ms.get_context("device_target") == "CPU" else nn.AdamWeightDecay
    return cls(params, learning_rate=learning_rate, beta1=beta1, beta2=beta2, eps=eps)


class TrainStep(nn.Cell):
    """One training step. Returns (loss, finite, loss_scale, grad_norm_before_clip), ``loss_scale`` being the
    scale this step used (``self.loss_scale`` holds the next step's).

    Args:
        network: the model (possibly wrapped for mixed precision by ``src.precision.apply_precision``).
        optimizer: an ``nn.AdamWeightDecay`` over the trainable parameters.
        ema_params / model_params: aligned tuples of EMA shadow parameters and the model
            parameters they follow (all of them, BatchNorm statistics included); ``None``: no EMA.
        reducer: ``nn.DistributedGradReducer`` for data parallel, else ``None``.
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer, *, loss_scale: float = 2.0 ** 24,
                 scale_factor: float = 2.0, scale_window: int = 2000, clip_norm: float | None = 1.0,
                 ema_params: tuple | None = None, model_params: tuple | None = None, ema_decay: float = 0.9999,
                 reducer: nn.Cell | None = None):
        super().__init__(auto_prefix=False)
        self.net_with_loss = _NetWithLoss(network, SoftTargetCrossEntropy())
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        # One forward pass gives the loss and the gradients. A separate `loss = net(...)` beside
        # `grad(net)(...)` (MindSpore's TrainOneStepCell pattern) runs the forward twice when the network
        # has side effects, as BatchNorm's running-statistics update: twice the forward time, and the
        # running statistics moved twice per step (momentum 0.9 acting as 0.81).
        self.loss_and_grads = ops.value_and_grad(_ScaledLoss(self.net_with_loss), grad_position=None,
                                                 weights=self.weights, has_aux=True)
        self.loss_scale = Parameter(Tensor(loss_scale, ms.float32), name=state_name("loss_scale"), requires_grad=False)
        self.good_steps = Parameter(Tensor(0, ms.int32), name=state_name("good_steps"), requires_grad=False)
        self.scale_factor = float(scale_factor)
        self.scale_window = int(scale_window)
        self.clip = clip_norm is not None
        self.clip_norm = float(clip_norm) if clip_norm is not None else 1.0
        self.use_ema = ema_params is not None
        self.ema_params = ms.ParameterTuple(ema_params) if self.use_ema else None
        self.model_params = ms.ParameterTuple(model_params) if self.use_ema else None
        self.ema_decay = float(ema_decay)
        self.ema_step = ops.operations.ApplyGradientDescent()
        self.ema_weight = Tensor(1.0 - self.ema_decay, ms.float32)
        self.reducer = reducer
        self.norm_as_matmul = ms.get_context("device_target") == "CPU"
        # CPU: one fused kernel over all gradients (float32, as the parameters are at every precision level)
        self.sum_of_squares = None
        if self.norm_as_matmul and all(w.dtype == ms.float32 for w in self.weights):
            self.sum_of_squares = kernels.sum_of_squares()

    def construct(self, images, target, drop_path_noise=None):
        scale = self.loss_scale.value()  # read now: the Parameter itself would return its updated value
        (_, loss), grads = self.loss_and_grads(images, target, drop_path_noise, scale)
        if self.reducer is not None:
            grads = self.reducer(grads)
        # The norm of the scaled gradients, then unscaled: one pass over the gradients fewer than unscaling
        # them first, and the same bits for a power-of-two scale (scaling by one is exact).
        if self.sum_of_squares is not None:
            sum_sq = self.sum_of_squares(*grads).reshape(())
        else:
            sum_sq = ops.stack([_sum_of_squares(g, self.norm_as_matmul) for g in grads]).sum()
        grad_norm = ops.sqrt(sum_sq) / scale
        finite = ops.isfinite(grad_norm)
        factor = 1.0 / scale
        if self.clip:
            # Same rule as ops.clip_by_global_norm, reusing the norm computed above.
            factor = factor * (self.clip_norm / ops.maximum(grad_norm, self.clip_norm))
        grads = _hyper_map(ops.partial(_scale_grads, factor), grads)  # unscale and clip in one pass
        if finite:
            loss = ops.depend(loss, self.optimizer(grads))
            if self.use_ema:
                loss = ops.depend(loss, _hyper_map(ops.partial(_ema_update, self.ema_step, self.ema_weight),
                                                   self.ema_params, self.model_params))
        loss = ops.depend(loss, self._update_scale(finite))
        return loss, finite, scale, grad_norm

    def compile_for(self, images, target, drop_path_noise=None) -> None:
        """Compile the step for this batch's shapes and dtypes before its first run, then hand the memory
        the compiler freed back to the OS (glibc keeps it otherwise). The first run's peak is then the
        runtime's alone: CoAtNet-0, batch 8, CPU: peak RSS 4,043 -> 3,806 MB (the compiler's scratch
        ~0.24 GB). Later calls with the same shapes reuse the graph. In PyNative mode there is no graph
        to compile: nothing is done."""
        if ms.get_context("mode") != ms.GRAPH_MODE:
            return
        self.compile(images, target, drop_path_noise)
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to trim
            pass

    def _update_scale(self, finite):
        one = ops.ones((), ms.int32)
        good = ops.select(finite, self.good_steps + one, ops.zeros((), ms.int32))
        grow = good >= self.scale_window
        shrunk = ops.maximum(self.loss_scale / self.scale_factor, ops.ones((), ms.float32))
        new_scale = ops.select(finite, ops.select(grow, self.loss_scale * self.scale_factor, self.loss_scale),
                               shrunk)
        good = ops.select(grow, ops.zeros((), ms.int32), good)
        return ops.depend(ops.assign(self.loss_scale, new_scale), ops.assign(self.good_steps, good))
