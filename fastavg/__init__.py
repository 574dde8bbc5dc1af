"""fastavg: fused weight averaging (EMA, SWA, LAWA) for PyTorch training."""

from .averager import Averager
from .ops import available_backends
from .optim import AveragedOptimizer, wrap
from .specs import EMA, LAWA, SWA

__version__ = "0.1.0"
__all__ = ["EMA", "SWA", "LAWA", "Averager", "AveragedOptimizer", "wrap", "available_backends", "__version__"]
