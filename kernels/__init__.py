"""Triton kernels for fastavg's fused ops (installed as ``fastavg.kernels``).

Each kernel sits beside its launcher. The parameters of a flat group are read through a table
built once per group (``table.py``): one launch covers any number of tensors.
"""

from ..table import build_table
from . import interpreter_fix
from .ring_mean import ring_mean_
from .swap import restore_, swap_in_, swap_in_ring_
from .table import INTERPRET
from .update import update_

if INTERPRET:
    interpreter_fix.apply()

__all__ = ["build_table", "update_", "swap_in_", "swap_in_ring_", "restore_", "ring_mean_"]
