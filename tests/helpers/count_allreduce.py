"""Run the training script while counting Horovod's gradient allreduces on this rank.

Horovod's DistributedOptimizer starts one `allreduce_async_` per gradient tensor each time its
backward hooks decide to communicate. The count is written to $COUNT_DIR/rank<r>.json.
"""

import json
import os
import sys
from pathlib import Path

import horovod.torch.optimizer as horovod_optimizer

calls = {"allreduce": 0}
_original = horovod_optimizer.allreduce_async_


def _counting(*args, **kwargs):
    calls["allreduce"] += 1
    return _original(*args, **kwargs)


horovod_optimizer.allreduce_async_ = _counting

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lars.cli import main  # noqa: E402

status = main(sys.argv[1:])
rank = os.environ["OMPI_COMM_WORLD_RANK"]  # Horovod is shut down by now
Path(os.environ["COUNT_DIR"], f"rank{rank}.json").write_text(json.dumps(calls))
sys.exit(status)
