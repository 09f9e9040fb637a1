"""lars: exact, fast LARS, TVLARS and LAMB for large-batch training, with schedules and LR scaling.

    from lars import LARS, param_groups
    optimizer = LARS(param_groups(model, weight_decay=1e-4), lr=5.0, momentum=0.9)

The training system (`lars.train`, launched by pytorch_imagenet_resnet.py) is imported on demand;
importing `lars` needs only torch (Horovod is imported by `lars.distributed` when it is used).
"""

from lars.factory import OPTIMIZERS, build_optimizer
from lars.optim import LAMB, LARS, TVLARS
from lars.param_groups import param_group_summary, param_groups
from lars.schedules import SCHEDULES, build_scheduler, epochs_to_steps, lr_at, scale_lr

__version__ = "0.1.0"

__all__ = [
    "LAMB",
    "LARS",
    "OPTIMIZERS",
    "SCHEDULES",
    "TVLARS",
    "build_optimizer",
    "build_scheduler",
    "epochs_to_steps",
    "lr_at",
    "param_group_summary",
    "param_groups",
    "scale_lr",
]
