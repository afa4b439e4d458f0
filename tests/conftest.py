"""Shared fixtures; the helpers themselves live in tests/support."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import write_tiny_model


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory) -> Path:
    from services.model import registry

    root = tmp_path_factory.mktemp("models")
    write_tiny_model(root, "test-v1")
    registry.promote(root, "test-v1")
    return root
