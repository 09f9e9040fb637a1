"""Metrics: top-1/top-5 and loss against counts made by hand; no host data per micro-batch."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lars.distributed import LocalBackend
from lars.metrics import DeviceCounters, TrainMeter, evaluate, topk_correct

# 6 samples, 7 classes, no ties. For each row, the rank of the true label among the logits
# (1 = largest) is written next to it; top-1 hits rank 1, top-5 hits ranks 1..5.
LOGITS = torch.tensor(
    [
        [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 0: rank 1
        [1.0, 9.0, 8.0, 3.0, 4.0, 5.0, 6.0],  # label 2: rank 2
        [7.0, 6.5, 6.0, 5.5, 5.0, 4.5, 4.0],  # label 4: rank 5
        [7.0, 6.5, 6.0, 5.5, 5.0, 4.5, 4.0],  # label 5: rank 6
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0: rank 7
        [3.0, 2.0, 1.0, 0.0, -1.0, -2.0, 10.0],  # label 6: rank 1
    ]
)
LABELS = torch.tensor([0, 2, 4, 5, 0, 6])
TOP1, TOP5 = 2, 4  # rows 0 and 5; rows 0, 1, 2, 5


def _hand_cross_entropy_sum() -> float:
    total = 0.0
    for row, label in zip(LOGITS.tolist(), LABELS.tolist()):
        total += math.log(sum(math.exp(v) for v in row)) - row[label]
    return total


def test_topk_counts_match_the_hand_count():
    assert topk_correct(LOGITS, LABELS).tolist() == [TOP1, TOP5]
    assert topk_correct(LOGITS, LABELS, ks=(1, 2, 7)).tolist() == [2, 3, 6]
    # Fewer classes than k: top-5 of 3 classes counts every sample.
    three = LOGITS[:, :3]
    assert topk_correct(three, torch.tensor([0, 1, 2, 0, 1, 2])).tolist()[1] == 6


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def test_evaluate_gives_whole_set_percentages_over_uneven_batches():
    # Batches of 4 and 2 (and one batch whose files were all unreadable): the figures are over
    # the 6 samples, not an average of per-batch percentages.
    loader = [
        (LOGITS[:4], LABELS[:4], []),
        (None, None, ["bad.jpg"]),
        (LOGITS[4:], LABELS[4:], []),
    ]
    got = evaluate(_Identity(), loader, LocalBackend(), torch.device("cpu"))
    assert got["samples"] == 6
    assert got["top1"] == pytest.approx(100.0 * TOP1 / 6, abs=1e-12)
    assert got["top5"] == pytest.approx(100.0 * TOP5 / 6, abs=1e-12)
    assert got["loss"] == pytest.approx(_hand_cross_entropy_sum() / 6, rel=1e-6)
    assert got["bad_paths"] == ["bad.jpg"]


def test_train_meter_sums_samples_not_batch_means():
    meter = TrainMeter("cpu")
    meter.update(torch.tensor(1.0), LOGITS[:4], LABELS[:4])  # 4 samples at loss 1
    meter.update(torch.tensor(4.0), LOGITS[4:], LABELS[4:])  # 2 samples at loss 4
    got = meter.read_and_reset(LocalBackend())
    assert got["loss"] == pytest.approx((4 * 1.0 + 2 * 4.0) / 6)
    assert got["top1"] == pytest.approx(100.0 * TOP1 / 6)
    assert meter.read_and_reset(LocalBackend()) == {"loss": 0.0, "top1": 0.0}  # reset


class _NoHostData(TorchDispatchMode):
    """Fails when an op consumes a tensor that neither existed before nor came out of an
    earlier op: such a tensor was made from host data (e.g. torch.tensor(n, device=...)),
    which on a GPU is a blocking host-to-device copy."""

    def __init__(self, known):
        super().__init__()
        self.known = {id(t) for t in known}
        self.foreign = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and id(leaf) not in self.known:
                self.foreign.append(str(func))
        out = func(*args, **kwargs)
        self.known |= {id(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        return out


def test_a_micro_batch_update_takes_no_data_from_the_host():
    # On the meta device a read (.item(), float(), .tolist()) fails outright, and the mode
    # catches tensors built from Python numbers.
    device = torch.device("meta")
    meter = TrainMeter(device)
    output = torch.empty(8, 10, device=device)
    labels = torch.empty(8, dtype=torch.long, device=device)
    loss = torch.empty((), device=device)
    with _NoHostData([output, labels, loss, meter.counters.sums]) as mode:
        for _ in range(3):
            meter.update(loss, output, labels)
    assert mode.foreign == []


def test_counters_read_once_with_one_allreduce():
    calls = []

    class Counting(LocalBackend):
        def allreduce_sum(self, tensor):
            calls.append(tensor.shape)
            return tensor * 2  # as if a second rank had counted the same

    counters = DeviceCounters(("a", "b"), "cpu")
    counters.add(a=torch.tensor(1.5), b=3)
    counters.add(a=0.5)
    assert counters.read(Counting()) == {"a": 4.0, "b": 6.0}
    assert calls == [torch.Size([2])]
    assert counters.read() == {"a": 0.0, "b": 0.0}
