"""What tests and benchmarks share: paths and media, free ports, real service processes,
pipelines, small models. Imported as ``from tests.support import ...``."""

from services.common.ports import free_base_port, free_port, port_is_free

from .models import write_tiny_model
from .paths import MEDIA, ROOT, TINY_REGISTRY, clip_frames, media
from .processes import TEST_ENV, Service, http_get, metric_samples, metric_sum, wait_for

__all__ = [
    "clip_frames",
    "MEDIA",
    "ROOT",
    "TEST_ENV",
    "TINY_REGISTRY",
    "Service",
    "free_base_port",
    "free_port",
    "http_get",
    "media",
    "metric_samples",
    "metric_sum",
    "port_is_free",
    "wait_for",
    "write_tiny_model",
]
