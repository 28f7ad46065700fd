"""A run's training state in one place: what a checkpoint holds besides the model weights (the EMA shadows,
both AdamWeightDecay moments, loss scale and counters), the names it has there, how the EMA is created and
swapped into an evaluation network, and how the state is saved and restored.

Checkpoint layout (the original MindSpore CoAtNet's names, which its users' files have): model weights under
their plain names (loadable by any MindSpore user without our code), ``ema.<name>``, ``adam_m.<name>``,
``adam_v.<name>``, and ``state.<counter>``. ``src.original_layout`` maps the original's own spellings
(``global_step``, ``scale_sense``) onto these."""
from __future__ import annotations

from collections.abc import Iterator

import mindspore as ms
import numpy as np
from mindspore import nn

__all__ = ["EMA_PREFIX", "MOMENT_PREFIXES", "STATE_PREFIX", "TRAIN_STATE_PREFIXES", "state_name", "create_ema",
           "TrainState"]

EMA_PREFIX = "ema."
MOMENT_PREFIXES = ("adam_m.", "adam_v.")  # AdamWeightDecay's first and second moments
STATE_PREFIX = "state."
TRAIN_STATE_PREFIXES = (EMA_PREFIX, *MOMENT_PREFIXES, STATE_PREFIX)
# Counters every training checkpoint has; "step" (train steps taken) came with mid-epoch checkpoints.
_REQUIRED = ("global_step", "loss_scale", "good_steps", "epoch")


def state_name(counter: str) -> str:
    """Checkpoint (and Parameter) name of a counter: ``state.loss_scale``..."""
    return STATE_PREFIX + counter


def create_ema(params: list[ms.Parameter], names: dict[int, str]) -> tuple[ms.Parameter, ...]:
    """EMA shadows of ``params`` (every model tensor, BatchNorm statistics included), named ``ema.<name>``."""
    return tuple(ms.Parameter(p.value().copy(), name=EMA_PREFIX + names[id(p)], requires_grad=False) for p in params)


class TrainState:
    """The state of one run: ``net`` (its parameters named by ``names``, id -> bare model name), the
    optimizer's moments and step counter, the train step's loss scale, the EMA shadows (or None)."""

    def __init__(self, net: nn.Cell, names: dict[int, str], optimizer: nn.AdamWeightDecay, step_cell: nn.Cell,
                 ema: tuple | None):
        self.net, self.names, self.optimizer, self.step_cell, self.ema = net, names, optimizer, step_cell, ema

    def copy_ema_into(self, eval_net: nn.Cell) -> None:
        """Give ``eval_net`` (a second instance of the model) the EMA weights, for scoring them."""
        for p, e in zip(eval_net.get_parameters(), self.ema, strict=True):
            p.set_data(e.value())

    def _moments(self) -> Iterator[tuple[str, ms.Parameter]]:
        """(checkpoint name, moment parameter) of both AdamWeightDecay moments of every weight."""
        for prefix, moments in zip(MOMENT_PREFIXES, (self.optimizer.moments1, self.optimizer.moments2), strict=True):
            for p, m in zip(self.optimizer.parameters, moments, strict=True):
                yield prefix + self.names[id(p)], m

    def to_params(self, epoch: int, step: int) -> dict:
        """Everything to save. ``epoch``: epochs completed; ``step``: train steps taken (the optimizer's own
        counter, which indexes the lr schedule, does not count steps skipped for a loss-scale overflow)."""
        params = {self.names[id(p)]: p for p in self.net.get_parameters()}
        params.update(self._moments())
        for p in self.ema or ():
            params[p.name] = p
        params[state_name("global_step")] = self.optimizer.global_step
        params[state_name("loss_scale")] = self.step_cell.loss_scale
        params[state_name("good_steps")] = self.step_cell.good_steps
        params[state_name("epoch")] = ms.Tensor(np.array(epoch, np.int32))
        params[state_name("step")] = ms.Tensor(np.array(step, np.int64))
        return params

    def load(self, params: dict, source: str, steps_per_epoch: int) -> tuple[int, int]:
        """Restore from checkpoint ``params`` (read from ``source``); returns (epochs completed, steps taken)."""
        from src.checkpoint import CheckpointError, load_into, model_weights

        load_into(self.net, model_weights(params), source, names=self.names)
        for key, m in self._moments():
            if key not in params:
                raise CheckpointError(f"{source} has no optimizer state '{key}': not a training checkpoint")
            m.set_data(ms.Tensor(params[key]))
        for p in self.ema or ():
            # A checkpoint trained without EMA starts the average from its weights.
            p.set_data(ms.Tensor(params.get(p.name, params[p.name[len(EMA_PREFIX):]])))
        for key in map(state_name, _REQUIRED):
            if key not in params:
                raise CheckpointError(f"{source} has no '{key}': not a training checkpoint")
        counter = self.optimizer.global_step
        counter.set_data(ms.Tensor(params[state_name("global_step")]).reshape(counter.shape).astype(counter.dtype))
        self.step_cell.loss_scale.set_data(ms.Tensor(params[state_name("loss_scale")], ms.float32))
        self.step_cell.good_steps.set_data(ms.Tensor(params[state_name("good_steps")], ms.int32))
        epoch = int(params[state_name("epoch")])
        # Checkpoints from before mid-epoch saves end an epoch: their step is the epoch's last.
        step = int(params[state_name("step")]) if state_name("step") in params else epoch * steps_per_epoch
        return epoch, step
