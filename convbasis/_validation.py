"""Scalar argument checks shared by every module (plain Python: no array library needed).

:mod:`convbasis._array` re-exports them beside the array validators.
"""

from __future__ import annotations

import inspect
import operator
import os

__all__ = ["broadcast_shapes", "check_integer", "user_stacklevel"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def check_integer(value, name, *, low=1, high=None, optional=False, what=None):
    """``value`` as an ``int`` in ``[low, high]`` (Python or NumPy-style integers, not bool).

    ``optional``: ``None`` passes through.  The message names the argument and the range:
    "a positive integer" (``low = 1``), "a non-negative integer" (``low = 0``), or the bounds,
    with ``what`` naming the upper bound (e.g. ``"n = 7"``).
    """
    if optional and value is None:
        return None
    if high is not None:
        expected = f"an integer in [{low}, {what or high}]"
    else:
        expected = {1: "a positive integer", 0: "a non-negative integer"}.get(
            low, f"an integer >= {low}"
        )
    if optional:
        expected += " or None"
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None
    if number < low or (high is not None and number > high):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number


def broadcast_shapes(*shapes):
    """The broadcast of ``shapes`` (NumPy's rules) as a tuple; ``ValueError`` if none exists.

    Plain Python, so every backend fails the same way: ``torch.broadcast_shapes`` raises
    ``RuntimeError`` where NumPy raises ``ValueError``.
    """
    ndim = max((len(shape) for shape in shapes), default=0)
    out = []
    for axis in range(-ndim, 0):
        sizes = {int(shape[axis]) for shape in shapes if len(shape) >= -axis} - {1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def user_stacklevel():
    """The ``stacklevel`` for ``warnings.warn`` that names the first caller outside convbasis.

    Call it where the warning is issued.  Public functions reach their work through helpers
    (grouped heads and lengths in :mod:`convbasis.batching`, operators, gradients), so no fixed
    level names the user's line on every route.
    """
    frame, level = inspect.currentframe(), 0
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return max(level, 1)
