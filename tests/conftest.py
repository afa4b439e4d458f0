"""Shared fixtures and the suite's scheduling; the helpers themselves live in tests/support."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import write_tiny_model

# The modules that take longest, in about that order. `make test` runs the suite on two
# workers (pytest-xdist, --dist loadgroup); each module is one group, so its module-scoped
# fixtures are built once, and the long ones are handed out first so both workers end together.
LONGEST_FIRST = (
    "test_training",
    "test_pipeline",
    "test_recovery",
    "test_tracker_pipeline",
    "test_hot_reload",
    "test_fuzz_sockets",
    "test_analyze",
    "test_regions",
    "test_source_loss",
    "test_hardening",
    "test_recorder_pipeline",
    "test_dashboard_browser",
    "test_curve",
)


def pytest_collection_modifyitems(config, items):
    """Every test without an ``xdist_group`` joins its module's group; the longest modules
    come first. Without xdist the groups are ignored and only the order changes."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2], len(rank)))


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory) -> Path:
    from services.model import registry

    root = tmp_path_factory.mktemp("models")
    write_tiny_model(root, "test-v1")
    registry.promote(root, "test-v1")
    return root
