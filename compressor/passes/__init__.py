"""The pass registry: recipe names -> pass classes."""

from compressor.passes.base import ParamError, Pass
from compressor.passes.prune import Magnitude, Wanda

PASSES: dict[str, type[Pass]] = {cls.name: cls for cls in (Magnitude, Wanda)}

__all__ = ["PASSES", "Pass", "ParamError"]
