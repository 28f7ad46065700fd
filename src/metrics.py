"""Top-k accuracy and the evaluation loop."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import nn

__all__ = ["topk_correct", "evaluate"]


def topk_correct(logits: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the k largest logits, for each k (k is capped at the
    number of classes, so top-5 of a 3-class problem is top-3)."""
    k_max = min(max(ks), logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k_max]
    hit = top == labels.reshape(-1, 1)
    return {k: int(hit[:, :min(k, k_max)].any(axis=1).sum()) for k in ks}


class _AllReduceSum(nn.Cell):
    # comm_func.all_reduce has no CPU kernel in MindSpore 2.10 ("Create kernelmod for op
    # InnerCommAllReduce failed"); the AllReduce primitive in a compiled cell works on every backend.
    def __init__(self):
        super().__init__()
        self.op = ms.ops.AllReduce(ms.ops.ReduceOp.SUM)

    def construct(self, x):
        return self.op(x)


def evaluate(net: nn.Cell, dataset, rank_size: int = 1) -> dict[str, float]:
    """Top-1/top-5 accuracy of ``net`` over ``dataset`` (columns image, label). With several ranks
    each evaluates its shard and the counts are summed across ranks."""
    net.set_train(False)
    counts = np.zeros(3, np.float64)  # top1, top5, samples
    for images, labels in dataset.create_tuple_iterator(num_epochs=1, output_numpy=False):
        logits = net(images).asnumpy()
        hits = topk_correct(logits, labels.asnumpy(), (1, 5))
        counts += (hits[1], hits[5], logits.shape[0])
    if rank_size > 1:
        counts = _AllReduceSum()(ms.Tensor(counts.astype(np.float32))).asnumpy().astype(np.float64)
    n = max(counts[2], 1.0)
    return {"top1": counts[0] / n, "top5": counts[1] / n, "num_samples": int(counts[2])}
