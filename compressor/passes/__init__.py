"""The pass registry: recipe names -> pass classes."""

from compressor.passes.awq import AWQ
from compressor.passes.base import ParamError, Pass
from compressor.passes.lowrank import LowRank
from compressor.passes.lrec import LREC
from compressor.passes.lrec_refine import LRECRefine
from compressor.passes.prune import Magnitude, SparseGPT, Wanda
from compressor.passes.quantize import GPTQ, RTN
from compressor.passes.rotate import Rotate
from compressor.passes.slice import Slice

PASSES: dict[str, type[Pass]] = {
    cls.name: cls for cls in (Rotate, Magnitude, Wanda, SparseGPT, AWQ, RTN, GPTQ, LREC, LRECRefine, LowRank, Slice)}

__all__ = ["PASSES", "Pass", "ParamError"]
