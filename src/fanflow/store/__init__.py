"""Durable runs: the SQLite result store, jobs, and sinks that stream results to files.

``fanflow.Store`` caches responses by request key and records jobs' items;
``JsonlSink``/``ParquetSink`` stream each item's result to a file as it completes.
Patterns take ``store=``, ``job=``, ``only_failed=`` and ``sink=``.
"""

from __future__ import annotations

from ._sinks import JsonlSink, ParquetSink, Sink, SinkStatistics, sink_for
from ._sqlite import DEFAULT_PATH, ItemInfo, JobInfo, Store, StoreStatistics

__all__ = [
    "DEFAULT_PATH",
    "ItemInfo",
    "JobInfo",
    "JsonlSink",
    "ParquetSink",
    "Sink",
    "SinkStatistics",
    "Store",
    "StoreStatistics",
    "sink_for",
]
