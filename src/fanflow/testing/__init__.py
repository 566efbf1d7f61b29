"""Test helpers shipped for fanflow's tests and for users' own: fakes that need no network.

``ScriptedLLM`` is an in-process fake model with scripted latency and failures.
"""

from ._scripted import Fault, ScriptedLLM

__all__ = ["Fault", "ScriptedLLM"]
