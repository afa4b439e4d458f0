"""The architectures, in plain Keras 3 (no backend-specific calls, so any backend runs them).

Every model takes exactly ``preprocess_faces`` output for its :class:`InputSpec` and
returns 7 softmax probabilities. Augmentation is part of the model as Keras
preprocessing layers: active in ``fit``, identity at inference, so the served model
needs no augmentation code and the classifier feeds it the same inputs as training.
"""

from __future__ import annotations

from pathlib import Path

import keras
from keras import layers

from services.common.protocol import EMOTIONS
from services.model.preprocess import InputSpec

ARCHITECTURES = ("compact", "mobilenetv2")
COMPACT_FILTERS = (32, 64, 128, 256)


class ModelError(Exception):
    """A model cannot be built as asked (e.g. weights unavailable)."""


def input_spec(arch: str, input_size: int | None = None) -> InputSpec:
    if arch == "compact":
        return InputSpec(input_size or 48, 1, "unit")
    if arch == "mobilenetv2":
        return InputSpec(input_size or 224, 3, "symmetric")
    raise ModelError(f"unknown architecture {arch!r} (one of {', '.join(ARCHITECTURES)})")


def build(
    arch: str,
    spec: InputSpec,
    *,
    width: float = 1.0,
    dropout: float = 0.4,
    weights: str = "none",
    seed: int | None = None,
) -> keras.Model:
    if arch == "compact":
        return compact(spec, width=width, dropout=dropout, seed=seed)
    if arch == "mobilenetv2":
        return mobilenetv2(spec, weights=weights, dropout=dropout, seed=seed)
    raise ModelError(f"unknown architecture {arch!r} (one of {', '.join(ARCHITECTURES)})")


def augmentation(spec: InputSpec, seed: int | None = None) -> keras.Sequential:
    """Mild geometric + photometric jitter; faces are already centred crops."""
    value_range = (0.0, 1.0) if spec.scaling == "unit" else (-1.0, 1.0)
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=seed),
            layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed),
            layers.RandomRotation(0.06, fill_mode="reflect", seed=seed),
            layers.RandomZoom(0.1, fill_mode="reflect", seed=seed),
            layers.RandomContrast(0.25, value_range=value_range, seed=seed),
            layers.RandomBrightness(0.1, value_range=value_range, seed=seed),
        ],
        name="augment",
    )


def _conv_bn_relu(x, filters: int, name: str):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _residual_stage(x, filters: int, name: str):
    """Two 3x3 convs with a (projected) shortcut: VGG's accuracy, ResNet's easy optimisation."""
    shortcut = x
    if x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_proj")(x)
        shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = _conv_bn_relu(x, filters, f"{name}_a")
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_b_conv")(y)
    y = layers.BatchNormalization(name=f"{name}_b_bn")(y)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))


def compact(
    spec: InputSpec = InputSpec(48, 1, "unit"),
    *,
    width: float = 1.0,
    dropout: float = 0.4,
    seed: int | None = None,
) -> keras.Model:
    """A small residual CNN for real time on a CPU (~1.2 M params at width 1).

    Two plain convs at full resolution (where every layer is costly), then residual
    stages at 24, 12 and 6 px with 64/128/256 x ``width`` filters, where the capacity
    is cheap; global average pooling keeps the classifier tiny.
    """
    filters = [max(4, int(round(f * width))) for f in COMPACT_FILTERS]
    inputs = keras.Input(spec.shape, name="face")
    x = augmentation(spec, seed)(inputs)
    x = _conv_bn_relu(x, filters[0], "stem1")
    x = _conv_bn_relu(x, filters[0], "stem2")
    for i, f in enumerate(filters[1:], start=1):
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
        x = _residual_stage(x, f, f"stage{i}")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = layers.Dense(len(EMOTIONS), activation="softmax", name="emotion")(x)
    return keras.Model(inputs, outputs, name=f"compact_w{width:g}")


def mobilenetv2(
    spec: InputSpec, *, weights: str = "none", dropout: float = 0.2, seed: int | None = None
) -> keras.Model:
    """The seed project's recipe: MobileNetV2 backbone + a 128-64-7 dense head."""
    if spec.channels != 3:
        raise ModelError("mobilenetv2 needs 3-channel input")
    backbone = _mobilenetv2_backbone(spec, weights)
    inputs = keras.Input(spec.shape, name="face")
    x = augmentation(spec, seed)(inputs)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(128, activation="relu", name="fc1")(x)
    x = layers.Dense(64, activation="relu", name="fc2")(x)
    x = layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = layers.Dense(len(EMOTIONS), activation="softmax", name="emotion")(x)
    return keras.Model(inputs, outputs, name=f"mobilenetv2_{spec.size}")


def _mobilenetv2_backbone(spec: InputSpec, weights: str) -> keras.Model:
    def make(w):
        return keras.applications.MobileNetV2(include_top=False, input_shape=spec.shape, weights=w)

    if weights == "none":
        return make(None)
    if weights == "imagenet":
        try:
            return make("imagenet")
        except Exception as exc:
            raise ModelError(
                f"cannot download ImageNet weights for MobileNetV2 ({type(exc).__name__}: {exc}). "
                f"Use --weights none to train from scratch, or --weights PATH to a local .h5 "
                f"file of MobileNetV2 no-top weights "
                f"(mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{spec.size}_no_top.h5)"
            ) from None
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found (--weights imagenet|none|PATH)")
    try:
        return make(str(path))
    except Exception as exc:
        raise ModelError(
            f"{path}: cannot load MobileNetV2 no-top weights ({type(exc).__name__}: {exc})"
        ) from None
