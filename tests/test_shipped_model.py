"""The model the repository ships (models/current): complete, loadable and servable.

``make run`` and ``docker compose up`` serve it out of the box, so a broken or partial
commit of models/ must fail here rather than at a user's first start.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.common.protocol import EMOTIONS
from services.model import registry
from tests.support import ROOT

MODELS = ROOT / "models"
pytestmark = pytest.mark.skipif(
    not (MODELS / registry.CURRENT).is_file(), reason="no model promoted in models/"
)


def test_current_names_a_complete_version():
    entry = registry.resolve(MODELS)
    assert entry.version in registry.history(MODELS)
    meta = entry.metadata
    assert meta["classes"] == list(EMOTIONS)
    assert meta["dataset"]["val_split"] == "PublicTest"
    for split in ("PublicTest", "PrivateTest"):
        report = json.loads((entry.path / f"eval-{split}.json").read_text())
        # every face of the split the version was trained with (3,589 in the rebuilt FER2013
        # CSV; 3,543 and 3,540 with the original pixels of the FER+ images)
        assert report.get("split", split) == split and report["n"] in (3589, meta["dataset"]["splits"][split])
        # scored the way the classifier serves it, so the model card's numbers are the served ones
        assert report.get("tta", "none") == entry.tta
        assert report.get("precision", "float32") == entry.precision
        assert np.asarray(report["confusion_matrix"]).sum() == report["n"]
        assert (entry.path / f"confusion-{split}.png").read_bytes()[:4] == b"\x89PNG"
    assert entry.model_file.stat().st_size <= 20 * 2**20


@pytest.mark.slow
def test_current_model_loads_and_answers_like_the_classifier():
    pytest.importorskip("tensorflow")
    from services.classifier.serving import load_served_model

    entry = registry.resolve(MODELS)
    served = load_served_model(entry)
    faces = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), np.uint8)
    probabilities = served.runner.predict_faces(faces)
    assert probabilities.shape == (3, len(EMOTIONS))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
