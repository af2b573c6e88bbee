"""A complete onestep plugin in one file: one-step regression onto minibatch-OT pairs.

The generator ``x = f(z)`` is fitted to the exact OT pairing of each batch, ``||f(z_perm) - x||^2``
(the endpoint-only special case of OT-NFM). Run it with no change to onestep:

    PYTHONPATH=examples onestep fit --config configs/otnfm --data.dataset 8gaussians \
        --model.class_path ot_regression.OTRegression --model.init_args.backbone '{name: mlp}'
"""

from typing import Any

import torch

from onestep.generators import OneStepGenerator
from onestep.generators.coupling import minibatch_ot
from onestep.nets import build_backbone


class OTRegression(OneStepGenerator):
    nfe = 1

    def __init__(self, data_shape=(2,), backbone=None, **base: Any) -> None:
        super().__init__(data_shape=data_shape, backbone=backbone, **base)
        self.net = build_backbone(backbone, self.data_shape, time_conditioned=False)

    def loss(self, x, idx):
        z = minibatch_ot(torch.randn_like(x), x)
        return (self.net(z) - x).square().mean()

    def generate(self, n, generator=None):
        return self.net(self.randn(n, generator=generator))
