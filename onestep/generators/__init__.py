"""Generator plugins. Each is a :class:`OneStepGenerator` subclass selected by its import path."""

from onestep.generators.base import OneStepGenerator
from onestep.generators.characteristic import CharacteristicGenerator
from onestep.generators.consistency import ConsistencyTraining
from onestep.generators.flow_matching import FlowMatching
from onestep.generators.gan import GAN
from onestep.generators.imle import IMLE
from onestep.generators.lmppm import LMPPM
from onestep.generators.magt import MAGT
from onestep.generators.meanflow import MeanFlow
from onestep.generators.otnfm import OTNFM

#: the shipped methods by config name (``configs/<name>/``); the contract test (tests/test_contract.py)
#: checks every entry, so a new method is one line here (plus its configs)
GENERATORS: dict[str, type[OneStepGenerator]] = {
    "flow_matching": FlowMatching,
    "otnfm": OTNFM,
    "magt": MAGT,
    "characteristic": CharacteristicGenerator,
    "lmppm": LMPPM,
    "gan": GAN,
    # the established one-step families, for comparison (issue 14)
    "imle": IMLE,
    "consistency": ConsistencyTraining,
    "meanflow": MeanFlow,
}

__all__ = ["OneStepGenerator", "CharacteristicGenerator", "ConsistencyTraining", "FlowMatching", "GAN", "IMLE", "LMPPM",
           "MAGT", "MeanFlow", "OTNFM", "GENERATORS"]
