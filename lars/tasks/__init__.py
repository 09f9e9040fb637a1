"""Tasks the trainer can run besides classification: each supplies its model, loss, metrics and
evaluation, while the loop, checkpoints, signals and logging stay shared (../DESIGN.md).

- `lars.tasks.barlowtwins`: the Barlow Twins model (backbone without classifier, projector,
  final BatchNorm); `lars.tasks.bt_loss`: its loss over the global batch and global-batch
  BatchNorm; `lars.tasks.bt_augment`: its two asymmetric views.
- `lars.tasks.linear_probe`: linear evaluation of a frozen backbone; `lars.tasks.knn`: a weighted
  k-NN monitor on features.

See docs/barlowtwins.md for the protocol and how the trainer calls these.
"""
