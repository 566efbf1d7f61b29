"""A handle's limits: :class:`Limits` and the controllers it can hold.

``fanflow.Limits`` is the same class; the controllers (:class:`Adaptive`,
:class:`Pacing`) and the defaults are the advanced knobs.
"""

from ._limits import DEFAULT_CONCURRENCY, DEFAULT_LIMITS, Adaptive, Limits, Pacing

__all__ = ["DEFAULT_CONCURRENCY", "DEFAULT_LIMITS", "Adaptive", "Limits", "Pacing"]
