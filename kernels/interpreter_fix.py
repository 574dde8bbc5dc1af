"""Triton's CPU interpreter (3.2 to 3.6) under numpy >= 2.4: scalars such as ``tl.program_id(0)`` are
1-element arrays there, and ``range()`` over them calls ``int(array)``, which numpy 2.4 made a
TypeError ("only 0-dimensional arrays can be converted to Python scalars"). Newer Tritons squeeze
the array first (triton-lang/triton#9171); this applies the same one-line fix where it is missing.
Compiled kernels on a GPU never go through this code.
"""

from __future__ import annotations

import inspect


def apply() -> bool:
    """Patch the interpreter's ``tensor.__index__`` if it lacks upstream's fix; True if patched."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_fastavg_fixed", False):
        return False
    try:
        if "squeeze" in inspect.getsource(original):
            return False  # upstream has the fix
    except (OSError, TypeError):
        pass  # no source to read: the patch is harmless where the fix exists

    def patched(tensor, *scope):
        # Triton 3.6 sets the class's attributes through a scope object; 3.2 to 3.5 take no scope and
        # set them on the class directly (the same int() inside, the same TypeError).
        original(tensor, *scope)
        index = lambda self: int(self.handle.data.squeeze())  # noqa: E731
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patched._fastavg_fixed = True
    interpreter._patch_lang_tensor = patched
    return True
