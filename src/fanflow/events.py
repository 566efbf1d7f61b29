"""Events emitted by the engine; hooks receive one of these each."""

from ._events import AttemptFailed, AttemptStarted, CallEnded, CallStarted, Event, Hook

__all__ = ["AttemptFailed", "AttemptStarted", "CallEnded", "CallStarted", "Event", "Hook"]
