"""Generator plugins. Each is a :class:`OneStepGenerator` subclass selected by its import path."""

from onestep.generators.base import OneStepGenerator
from onestep.generators.characteristic import CharacteristicGenerator
from onestep.generators.flow_matching import FlowMatching
from onestep.generators.lmppm import LMPPM
from onestep.generators.magt import MAGT
from onestep.generators.otnfm import OTNFM

__all__ = ["OneStepGenerator", "CharacteristicGenerator", "FlowMatching", "LMPPM", "MAGT", "OTNFM"]
