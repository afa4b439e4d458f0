"""Shared fixtures; the helpers themselves live in tests/support."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import write_tiny_model

# The suite's own processes bind loopback and run without sign-in, also those started with
# os.environ rather than TEST_ENV; the authentication tests turn it on for theirs.
os.environ.setdefault("EMOTION_AUTH", "off")


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory) -> Path:
    from services.model import registry

    root = tmp_path_factory.mktemp("models")
    write_tiny_model(root, "test-v1")
    registry.promote(root, "test-v1")
    return root
