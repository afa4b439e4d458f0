"""Inference copies of a trained Keras model: the same answers, less work per face.

A trained model carries layers that only matter in training. At inference the
augmentation layers and dropout pass their input through, and each BatchNormalization
after a convolution is a fixed per-channel scale and shift, which can be folded into that
convolution's kernel and bias. Keras still runs all of them (and, in bfloat16, casts
around every BatchNormalization), so :func:`for_inference` rebuilds the functional graph
without them. :func:`in_bfloat16` then makes a copy computing in bfloat16.

Both work on the model's config, so any functional model is handled; a model they cannot
rebuild (a Sequential one, custom layers) is served as it is.
"""

from __future__ import annotations

import json

import numpy as np

# Layers that return their input unchanged when training=False.
IDENTITY_AT_INFERENCE = (
    "Dropout",
    "SpatialDropout2D",
    "GaussianNoise",
    "GaussianDropout",
    "RandomFlip",
    "RandomTranslation",
    "RandomRotation",
    "RandomZoom",
    "RandomContrast",
    "RandomBrightness",
    "RandomCrop",
)
# The folded answers must match the original's this closely, or the original is served.
FOLD_TOLERANCE = 1e-4


def _is_identity(layer: dict) -> bool:
    if layer["class_name"] in IDENTITY_AT_INFERENCE:
        return True
    if layer["class_name"] == "Sequential":
        inner = [item for item in layer["config"]["layers"] if item["class_name"] != "InputLayer"]
        return all(_is_identity(item) for item in inner)
    return False


def _nodes(node, class_name: str) -> list:
    """Every dict with this ``class_name`` inside a (JSON-like) Keras config."""
    if isinstance(node, dict):
        if node.get("class_name") == class_name:
            return [node]
        return [found for value in node.values() for found in _nodes(value, class_name)]
    if isinstance(node, list):
        return [found for value in node for found in _nodes(value, class_name)]
    return []


def _tensor_refs(node) -> list:
    """Every ``keras_history`` ([layer name, node, tensor]) in a layer's inbound nodes."""
    return [tensor["config"]["keras_history"] for tensor in _nodes(node, "__keras_tensor__")]


def _outputs(config: dict) -> list:
    outputs = config["output_layers"]
    return [outputs] if outputs and isinstance(outputs[0], str) else outputs


def _plan(config: dict) -> tuple[dict, dict]:
    """(layer to skip -> the tensor that replaces its output, conv -> its BN)."""
    layers = {layer["name"]: layer for layer in config["layers"]}
    uses: dict[str, int] = {}
    for layer in config["layers"]:
        for ref in _tensor_refs(layer.get("inbound_nodes", [])):
            uses[ref[0]] = uses.get(ref[0], 0) + 1
    for ref in _outputs(config):
        uses[ref[0]] = uses.get(ref[0], 0) + 1
    skip, folds = {}, {}
    for layer in config["layers"]:
        refs = _tensor_refs(layer.get("inbound_nodes", []))
        if len(layer.get("inbound_nodes", [])) != 1 or len(refs) != 1:
            continue
        source = layers[refs[0][0]]
        if _is_identity(layer):
            skip[layer["name"]] = refs[0]
        elif (
            layer["class_name"] == "BatchNormalization"
            and layer["config"].get("axis") in (-1, 3, [-1], [3])
            and source["class_name"] == "Conv2D"
            and uses[source["name"]] == 1
            and source["config"].get("activation") == "linear"
            and source["config"].get("data_format", "channels_last") == "channels_last"
        ):
            skip[layer["name"]] = refs[0]
            folds[source["name"]] = layer["name"]
    for name in skip:  # a chain of skipped layers: follow it to the end
        while skip[name][0] in skip:
            skip[name] = skip[skip[name][0]]
    return skip, folds


def _folded_weights(conv, bn) -> list:
    weights = conv.get_weights()
    kernel, bias = weights[0], (weights[1] if len(weights) > 1 else 0.0)
    gamma = bn.gamma.numpy() if bn.scale else 1.0
    beta = bn.beta.numpy() if bn.center else 0.0
    scale = gamma / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    return [kernel * scale, (bias - bn.moving_mean.numpy()) * scale + beta]


def fold_for_inference(model):
    """The model without its inference no-ops, BatchNormalization folded into the
    convolutions before it; the model itself when it is not a functional one."""
    config = json.loads(json.dumps(model.get_config()))  # plain lists, editable
    if "input_layers" not in config:
        return model
    skip, folds = _plan(config)
    if not skip:
        return model
    config["layers"] = [layer for layer in config["layers"] if layer["name"] not in skip]
    for ref in [
        *_outputs(config),
        *(r for layer in config["layers"] for r in _tensor_refs(layer.get("inbound_nodes", []))),
    ]:
        if ref[0] in skip:
            ref[:] = skip[ref[0]]
    for layer in config["layers"]:
        if layer["name"] in folds:
            layer["config"]["use_bias"] = True
    lean = model.__class__.from_config(config)
    original = {layer.name: layer for layer in model.layers}
    for layer in lean.layers:
        if layer.name in folds:
            layer.set_weights(_folded_weights(original[layer.name], original[folds[layer.name]]))
        elif layer.weights:
            layer.set_weights(original[layer.name].get_weights())
    return lean


def for_inference(model, sample: np.ndarray):
    """(model to serve, note): the folded model when it gives the original's answers on
    ``sample``, else the original and why."""
    try:
        lean = fold_for_inference(model)
    except Exception as exc:  # any model Keras can load must still be served
        return model, f"served unfolded ({type(exc).__name__}: {str(exc)[:200]})"
    if lean is model:
        return model, ""
    difference = float(
        np.abs(np.asarray(lean(sample, training=False)) - np.asarray(model(sample, training=False))).max()
    )
    if difference > FOLD_TOLERANCE:
        return model, f"served unfolded (folding changed the answers by {difference:.1e})"
    return lean, ""


def in_bfloat16(model):
    """A copy of ``model`` computing in bfloat16, with float32 weights and a float32 last
    layer (Keras' mixed_bfloat16 policy), so the probabilities keep float32 resolution."""
    config = json.loads(json.dumps(model.get_config()))  # plain lists, editable
    last = model.layers[-1].name
    for layer in config["layers"]:
        if layer["config"].get("name") != last:
            for policy in _nodes(layer, "DTypePolicy"):
                policy["config"]["name"] = "mixed_bfloat16"
    copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    return copy
