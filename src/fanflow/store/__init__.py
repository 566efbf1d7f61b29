"""Durable runs: the SQLite result store, jobs, and sinks that stream results to files.

``fanflow.Store`` caches responses by request key and records jobs' items;
``JsonlSink``/``ParquetSink`` stream each item's result to a file as it completes.
Patterns take ``store=``, ``job=``, ``only_failed=`` and ``sink=``.

``ResultStore`` and ``JobStore`` are the protocols a store implements (``_base.py``);
everything above this package types against them, not against the SQLite class.
This package imports nothing of fanflow but its core types and errors.
"""

from __future__ import annotations

from ._base import ItemInfo, ItemRef, JobInfo, JobStore, ResultStore
from ._sinks import JsonlSink, ParquetSink, Sink, SinkStatistics, sink_for
from ._sqlite import DEFAULT_PATH, Store, StoreStatistics

__all__ = [
    "DEFAULT_PATH",
    "ItemInfo",
    "ItemRef",
    "JobInfo",
    "JobStore",
    "JsonlSink",
    "ParquetSink",
    "ResultStore",
    "Sink",
    "SinkStatistics",
    "Store",
    "StoreStatistics",
    "sink_for",
]
