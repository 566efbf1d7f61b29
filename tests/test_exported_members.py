"""__all__ lists exactly the public names (after httpx's tests/test_exported_members.py)."""

from __future__ import annotations

import fanflow
import fanflow.backends
import fanflow.errors
import fanflow.events
import fanflow.limits
import fanflow.patterns
import fanflow.providers
import fanflow.results
import fanflow.routing
import fanflow.testing


def test_all_matches_public_names() -> None:
    for module in (
        fanflow,
        fanflow.backends,
        fanflow.errors,
        fanflow.events,
        fanflow.limits,
        fanflow.patterns,
        fanflow.providers,
        fanflow.results,
        fanflow.routing,
        fanflow.testing,
    ):
        public = {
            name
            for name in dir(module)
            if not name.startswith("_")
            and not isinstance(getattr(module, name), type(fanflow))  # submodules
            and name != "annotations"
        }
        assert set(module.__all__) == public | ({"__version__"} & set(module.__all__)), module


def test_top_level_surface_stays_small() -> None:
    assert len(fanflow.__all__) <= 60


def test_version_comes_from_metadata() -> None:
    from importlib.metadata import version

    assert fanflow.__version__ == version("fanflow")


def test_reprs_say_fanflow() -> None:
    assert repr(fanflow.Limits(concurrency=2)).startswith("fanflow.Limits")
    assert repr(fanflow.RetryPolicy()).startswith("fanflow.RetryPolicy")
    assert repr(fanflow.function(lambda r: "x", name="f")) == "fanflow.function(f)"
