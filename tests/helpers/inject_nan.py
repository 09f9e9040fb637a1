"""Run the training script with NaN losses injected at chosen forward calls of the loss.

NAN_AT_CALLS="3,4" makes the 3rd and 4th calls of CrossEntropyLoss.forward (or, with --task
barlowtwins, of its criterion) return NaN on every rank (calls count from 1), so the gradients of
those micro-batches become NaN.
"""

import os
import sys
from pathlib import Path

import torch

calls = {"n": 0}
targets = {int(x) for x in os.environ["NAN_AT_CALLS"].split(",")}
_original = torch.nn.CrossEntropyLoss.forward


def _forward(self, output, labels):
    calls["n"] += 1
    loss = _original(self, output, labels)
    return loss * float("nan") if calls["n"] in targets else loss


torch.nn.CrossEntropyLoss.forward = _forward
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lars.tasks.barlowtwins import BarlowTwinsCriterion  # noqa: E402

_criterion = BarlowTwinsCriterion.__call__


def _barlow_twins(self, output, labels=None):
    calls["n"] += 1
    loss = _criterion(self, output, labels)
    return loss * float("nan") if calls["n"] in targets else loss


BarlowTwinsCriterion.__call__ = _barlow_twins
from lars.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
