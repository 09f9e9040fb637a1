"""AlexNet with BatchNorm ("AlexNet-BN"), the model of the SystemDS LARS comparison.

LARS was first shown on AlexNet-BN (You, Gitman, Ginsburg 2017, "Large Batch Training of
Convolutional Networks", arXiv:1708.03888): AlexNet with Batch Normalization after every
convolution, which is what lets its batch grow to 8K-32K. The SystemDS example
(apache/systemds, scripts/nn/examples, README "LARS Optimizer Implementation for ImageNet Training
in SystemDS") describes the variant it compares optimizers on: batch normalization after each of
the 5 convolutions, local response normalization after the first two, 3 max-pools, and dropout 0.5
in the two hidden fully connected layers. torchvision's `alexnet` has neither BatchNorm nor LRN.

Layers (224 x 224 input; the filter counts of Krizhevsky et al. 2012 and of the SystemDS network,
scripts/nn/networks/alexnet.dml: 96, 256, 384, 384, 256; torchvision's alexnet has 64, 192, 384,
256, 256):

    conv 11x11/4 pad 2, 96 -> BN -> ReLU -> LRN -> max-pool 3/2
    conv 5x5 pad 2, 256    -> BN -> ReLU -> LRN -> max-pool 3/2
    conv 3x3 pad 1, 384    -> BN -> ReLU
    conv 3x3 pad 1, 384    -> BN -> ReLU
    conv 3x3 pad 1, 256    -> BN -> ReLU -> max-pool 3/2 -> adaptive average pool 6x6
    dropout 0.5 -> fc 9216 -> 4096 -> ReLU -> dropout 0.5 -> fc 4096 -> 4096 -> ReLU -> fc classes

LRN as in Krizhevsky et al. 2012, section 3.3: size 5, alpha 1e-4, beta 0.75, k 2. The
convolutions have no bias: the BatchNorm that follows each one has its own shift, so a bias would
be a redundant parameter (and one more tensor for LARS's no-adaptation group).
"""

from __future__ import annotations

import torch.nn as nn

LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
DROPOUT = 0.5
# (in, out, kernel, stride, padding, LRN after it, max-pool after it)
CONVOLUTIONS = (
    (3, 96, 11, 4, 2, True, True),
    (96, 256, 5, 1, 2, True, True),
    (256, 384, 3, 1, 1, False, False),
    (384, 384, 3, 1, 1, False, False),
    (384, 256, 3, 1, 1, False, True),
)


class AlexNetBN(nn.Module):
    """AlexNet with BatchNorm after every convolution and LRN after the first two."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out, kernel, stride, padding, lrn, pool in CONVOLUTIONS:
            layers += [
                nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            if lrn:
                layers.append(nn.LocalResponseNorm(**LRN))
            if pool:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(DROPOUT),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(DROPOUT),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def alexnet_bn(num_classes: int = 1000) -> AlexNetBN:
    """The builder to register in lars.models as `alexnet_bn`."""
    return AlexNetBN(num_classes)
