"""The input spec and its one preprocessing function: the face normalisation a version was
trained with is stored in its metadata and applied to every crop it sees."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from services.model import registry
from services.model.preprocess import InputSpec, preprocess_faces


def test_normalisation_round_trips_through_metadata(tmp_path):
    spec = InputSpec(48, 1, "unit", "equalize")
    (tmp_path / registry.MODEL_FILE).write_bytes(b"")
    (tmp_path / registry.METADATA_FILE).write_text(json.dumps({"input": spec.to_dict()}))
    entry = registry.read_entry(tmp_path)
    assert entry.spec == spec and entry.spec.normalisation == "equalize"
    assert spec.network() == InputSpec(48, 1, "unit")


def test_metadata_without_normalisation_loads_as_none(tmp_path):
    (tmp_path / registry.MODEL_FILE).write_bytes(b"")
    (tmp_path / registry.METADATA_FILE).write_text(
        json.dumps({"input": {"size": 48, "channels": 1, "scaling": "unit"}})
    )
    assert registry.read_entry(tmp_path).spec == InputSpec(48, 1, "unit", "none")


def test_unknown_normalisation_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="normalisation must be one of"):
        InputSpec(48, 1, "unit", "whiten")
    (tmp_path / registry.MODEL_FILE).write_bytes(b"")
    (tmp_path / registry.METADATA_FILE).write_text(
        json.dumps({"input": {"size": 48, "channels": 1, "scaling": "unit", "normalisation": "whiten"}})
    )
    with pytest.raises(registry.RegistryError, match="metadata.json: bad or missing 'input' spec"):
        _ = registry.read_entry(tmp_path).spec


def test_normalisation_acts_on_the_face_at_the_models_size():
    rng = np.random.default_rng(0)
    dull = rng.integers(100, 140, (3, 96, 96), np.uint8)  # low contrast, twice the model's size
    plain = preprocess_faces(dull, InputSpec(48, 1, "unit"))
    equalized = preprocess_faces(dull, InputSpec(48, 1, "unit", "equalize"))
    clahe = preprocess_faces(dull, InputSpec(48, 1, "unit", "clahe"))
    small = np.stack([cv2.resize(face, (48, 48), interpolation=cv2.INTER_AREA) for face in dull])
    np.testing.assert_array_equal(plain[..., 0], small * np.float32(1 / 255))
    expected = np.stack([cv2.equalizeHist(face) for face in small]) * np.float32(1 / 255)
    np.testing.assert_array_equal(equalized[..., 0], expected)
    assert np.ptp(plain) < 0.2 and np.ptp(equalized) > 0.95 and 0.2 < np.ptp(clahe) < 1
    colour = rng.integers(100, 140, (2, 48, 48, 3), np.uint8)
    rgb = preprocess_faces(colour, InputSpec(48, 3, "symmetric", "equalize"))
    assert rgb.shape == (2, 48, 48, 3) and rgb.min() >= -1 and rgb.max() <= 1 and np.ptp(rgb) > 1.5
