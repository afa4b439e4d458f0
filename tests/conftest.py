"""Shared fixtures and the suite's scheduling; the helpers themselves live in tests/support."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.recorder import store
from services.recorder.schema import metadata
from tests.support import TINY_REGISTRY, postgres

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The workers share the cores: TensorFlow in each (the training tests in the worker, the
    # classifiers it starts) keeps to one thread per operation, so that a worker that trains
    # does not starve the other's pipeline (shutdown times and max ages are checked there).
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    # Each worker picks free ports from its own part of the range, and so do the processes
    # it starts (services/common/ports.py): two workers never race for one port.
    worker = os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw")
    os.environ["EMOTION_PORT_SLICE"] = f"{worker}/{os.environ['PYTEST_XDIST_WORKER_COUNT']}"

# The modules that take longest, in about that order. `make test` runs the suite on three
# workers (pytest-xdist, --dist loadscope --no-loadscope-reorder): each module runs whole on
# one worker, so its module-scoped fixtures are built once, and the long modules are handed
# out first so that the workers end at about the same time.
LONGEST_FIRST = (
    "test_training",
    "test_tracker_pipeline",
    "test_recovery",
    "test_pipeline",
    "test_hot_reload",
    "test_analyze",
    "test_fuzz_sockets",
    "test_regions",
    "test_dashboard_browser",
    "test_cameras_pipeline",
    "test_source_loss",
    "test_hardening",
    "test_recorder_pipeline",
    "test_curve",
)


def pytest_collection_modifyitems(config, items):
    """The longest modules first; within a module the order stays as written."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2], len(rank)))


# The suite's own processes bind loopback and run without sign-in, also those started with
# os.environ rather than TEST_ENV; the authentication tests turn it on for theirs.
os.environ.setdefault("EMOTION_AUTH", "off")


@pytest.fixture(scope="module")
def eager_tensorflow():
    """TensorFlow functions run op by op instead of being traced into graphs first. On the
    training tests' few tiny batches, tracing Keras's training step took about 20 s per run
    and running it a second; what a run computes is the same either way."""
    import tensorflow as tf

    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory) -> Path:
    """A registry serving a tiny int8 version, as the shipped one is: a copy of the committed
    tests/fixtures/tiny-registry, whose TFLite model is kept beside it, so neither the
    test worker nor the classifiers of its pipelines import TensorFlow for it."""
    import shutil

    from services.model import registry

    root = tmp_path_factory.mktemp("models")
    shutil.copytree(TINY_REGISTRY / "test-v1", root / "test-v1")
    registry.promote(root, "test-v1")
    return root


# The recorder's database, on SQLite and on a throw-away PostgreSQL server (tests/support/postgres.py).


@pytest.fixture(scope="module")
def pg_url():
    if not postgres.available():
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    server = postgres.Postgres().start()
    yield server.url
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        url = str(tmp_path / "recorder.db")
    else:
        url = request.getfixturevalue("pg_url")
    engine = store.make_engine(url)
    if request.param == "postgresql":
        metadata.drop_all(engine)
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    store.migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite(tmp_path):
    engine = store.make_engine(str(tmp_path / "recorder.db"))
    store.migrate(engine)
    yield engine
    engine.dispose()
