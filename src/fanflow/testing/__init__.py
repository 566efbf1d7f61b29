"""Test helpers shipped for fanflow's tests and for users' own: fakes that need no network.

``ScriptedLLM`` is an in-process fake model with scripted latency and failures.
``SimServer`` is an OpenAI- and Anthropic-compatible HTTP server on loopback, with
latency, rate limits and faults, for testing real HTTP clients offline.
``MockTransport`` answers an HTTP handle's requests from a function, with no server.
"""

from ._mock import MockReply, MockTransport
from ._scripted import Fault, ScriptedLLM
from ._sim import FAULTS, SimBatches, SimCache, SimSecond, SimServer, SimStats
from ._simwire import SimRequest

__all__ = [
    "FAULTS",
    "Fault",
    "MockReply",
    "MockTransport",
    "ScriptedLLM",
    "SimBatches",
    "SimCache",
    "SimRequest",
    "SimSecond",
    "SimServer",
    "SimStats",
]
