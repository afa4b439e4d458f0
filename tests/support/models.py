"""Small registered models for tests and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

from .paths import TINY_REGISTRY


def write_tiny_model(
    registry_dir: Path,
    version: str,
    seed: int = 0,
    outputs: int = 7,
    precision: str = "float32",
    keep_tflite: bool = False,
) -> Path:
    """A small randomly initialised 7-class model, registered like a trained one; with
    ``keep_tflite``, its TFLite model is kept beside it (registry.tflite_file), as a
    classifier keeps it, so one serving it never imports TensorFlow."""
    import keras

    from services.common.protocol import EMOTIONS
    from services.model.preprocess import InputSpec

    spec = InputSpec(48, 1, "unit")
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input(spec.shape),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(outputs, activation="softmax"),
        ]
    )
    folder = registry_dir / version
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    (folder / "metadata.json").write_text(
        json.dumps(
            {
                "version": version,
                "architecture": "test-tiny",
                "input": spec.to_dict(),
                "classes": list(EMOTIONS),
                "precision": precision,
                "note": "random weights, for tests only",
            }
        )
    )
    if keep_tflite:
        from services.model import registry
        from services.model.runtime import kept_tflite, tflite_model

        path = kept_tflite(registry.read_entry(folder), "tflite")
        registry.keep_tflite(path, tflite_model(model, int8=precision == "int8"))
    return folder


def write_fixture_registry(root: Path = TINY_REGISTRY) -> Path:
    """(Re)write the committed tiny registry (tests/fixtures/tiny-registry) after a change
    of write_tiny_model or of the TFLite conversion."""
    import shutil

    shutil.rmtree(root / "test-v1", ignore_errors=True)
    return write_tiny_model(root, "test-v1", precision="int8", keep_tflite=True)


if __name__ == "__main__":
    print(f"wrote {write_fixture_registry()}")
