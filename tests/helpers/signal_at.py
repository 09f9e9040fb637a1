"""Run the training script and send this process SIGTERM at the Nth call of torch.optim.SGD.step.

SIGTERM_AT_SGD_STEP=N: the linear probe of --task barlowtwins is the run's only SGD optimizer
(pre-training uses lars.optim), so this preempts the run inside the probe stage at a chosen
batch, on every rank at once, as a cluster's scheduler would.
"""

import os
import signal
import sys
from pathlib import Path

import torch

calls = {"n": 0}
target = int(os.environ["SIGTERM_AT_SGD_STEP"])
_original = torch.optim.SGD.step


def _step(self, *args, **kwargs):
    calls["n"] += 1
    result = _original(self, *args, **kwargs)
    if calls["n"] == target:
        os.kill(os.getpid(), signal.SIGTERM)
    return result


torch.optim.SGD.step = _step
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lars.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
