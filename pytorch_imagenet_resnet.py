#!/usr/bin/env python3
"""Large-batch ImageNet training with LARS, TVLARS and LAMB, averaged with Horovod.

Every rank runs this script. On a laptop (trains on the embedded sample dataset, CPU):

    mpirun -np 2 python pytorch_imagenet_resnet.py

On a cluster (ResNet-50, global batch 8 x 128 x 4 = 4096):

    mpirun -np 8 python pytorch_imagenet_resnet.py --epochs 90 --model resnet50 --batch-size 128 \\
      --warmup-epochs 0.3125 --train-dir=IMAGENET/train --val-dir=IMAGENET/val \\
      --base-lr 5.6568542494924 --base-op lars --bn-bias-separately --wd 0.0001 \\
      --lr-scaling keep --batches-per-allreduce 4

`--help` lists every flag; the training system lives in the `lars` package (lars/train.py).

The preemption handler is installed before anything else, torch included: a SIGTERM or SIGUSR1
during start-up (imports, `hvd.init()`, data checks) is recorded instead of killing this rank, so
the other ranks are not left waiting in `hvd.init()`; the first stop agreement, before the first
step, then ends every rank with status 3 (lars/signals.py has the rules and the deadline).
"""

import sys

from lars.signals import install_preemption_handler, stop_deadline

if __name__ == "__main__":
    install_preemption_handler(deadline=stop_deadline())
    from lars.cli import main  # the heavy imports (torch, horovod) start here

    sys.exit(main())
