"""Runs a Keras model fast on small, varying batches.

``model.predict`` costs tens of milliseconds per call in overhead; a ``tf.function``
around ``model(x, training=False)`` costs about two. Batches are padded up to a few
fixed sizes so the function is traced once per size, never once per batch.

Two runtimes: ``tf-function`` and ``tflite``, the same model converted to TensorFlow Lite
(run by LiteRT, with its XNNPACK kernels) with one interpreter per padded size. TFLite
takes the least CPU per face at every batch size (about 3 ms for the compact model on one
core, against 4-10 ms for tf-function), but runs on one thread, so a large batch takes
longer from end to end. ``auto`` (the default) uses TFLite for batches of up to 8 model
inputs and the tf.function above -- or TFLite alone for an int8 version.

A version may also ask for flip test-time augmentation (``"tta": "flip"`` in its
metadata): every face is run twice, as is and mirrored, and the two answers averaged.
A caller may ask otherwise for some faces: ``tta="none"`` (as is) or ``"mirror"`` (the mirror
image only). The classifier alternates the two on the frames of live streams, whose
answers the tracker averages over time: both views at the cost of one.

And a version may ask for another precision (``"precision"`` in its metadata):

- ``bfloat16``: the tf.function computes in bfloat16 on CPUs with native bfloat16
  arithmetic (AVX512-BF16 or AMX), while the weights stay float32 and the softmax is
  computed in float32. Elsewhere bfloat16 would be emulated and slower, so the runner
  falls back to float32 and says why. Under ``auto`` the small batches still run on
  TFLite in float32: on this model TFLite's one thread costs less CPU than bfloat16's many.
- ``int8``: TFLite with dynamic-range quantisation: weights stored as 8-bit integers,
  activations quantised on the fly, no calibration data needed. About a fifth of float32
  TFLite's CPU per face; ``python -m training derive --precision int8`` scores it on
  PublicTest before it can be served.

Either way the runner serves an inference copy of the model (optimize.py): training-only
layers dropped and BatchNormalization folded into the convolutions: the same answers at
about 1.1 times the faces/s in float32 and 1.4 times in bfloat16.
"""

from __future__ import annotations

import numpy as np

from .optimize import for_inference, in_bfloat16
from .preprocess import InputSpec, preprocess_faces
from .registry import PRECISIONS, TTA_MODES, ModelEntry, check_answers, tflite_file

# Padded batch sizes: small steps where a frame or two of one or two faces are batched
# (padding 2 inputs to 4 doubles the work), 32 = the default --max-batch unpadded.
BATCH_SHAPES = (1, 2, 4, 8, 16, 32, 64)
RUNTIMES = ("auto", "tf-function", "tflite")
HYBRID = "tflite+tf-function"  # what auto runs where it can
SMALL_BATCH = 8  # model inputs: up to here TFLite's one thread costs less CPU
NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags in /proc/cpuinfo


class RuntimeUnavailable(Exception):
    """The model cannot run on the runtime asked for (e.g. TFLite conversion failed)."""


def flip_averaged(call, inputs: np.ndarray) -> np.ndarray:
    """``call`` on the inputs and their mirror images in one batch, the two answers averaged."""
    n = len(inputs)
    both = np.asarray(call(np.concatenate([inputs, inputs[:, :, ::-1, :]])))
    return (both[:n] + both[n:]) / 2


def native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in NATIVE_BFLOAT16_FLAGS)
    except OSError:
        pass
    return False


def precision_unavailable(runtime: str, precision: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """Why ``runtime`` cannot compute in ``precision`` here ("" when it can). ``auto`` and
    the hybrid are judged by the part that would use the precision (bfloat16 runs on the
    tf.function, int8 on TFLite)."""
    if precision == "bfloat16":
        if runtime == "tflite":
            return "the tflite runtime runs float32 and int8 models only"
        if not native_bfloat16(cpuinfo):
            return (
                f"this CPU has no native bfloat16 arithmetic ({' or '.join(NATIVE_BFLOAT16_FLAGS)}"
                f" in {cpuinfo}), where emulated bfloat16 is slower than float32"
            )
    if precision == "int8" and runtime in ("tf-function", HYBRID):
        return f"int8 weights run on TFLite only (--runtime tflite or auto), not {runtime}"
    return ""


def compiled_call(model):
    """``model(x, training=False)`` behind ``tf.function`` on TensorFlow (a plain call on
    other Keras backends, which the training CLI may use)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda x: model(x, training=False), reduce_retracing=False)
    return lambda x: model(x, training=False)


def tflite_model(model, int8: bool = False) -> bytes:
    """The model as a TFLite flatbuffer, its weights quantised to int8 if asked (raises
    RuntimeUnavailable with the reason)."""
    try:
        import tensorflow as tf

        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if int8:  # dynamic-range quantisation: int8 weights, no calibration data
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        return converter.convert()
    except Exception as exc:
        raise RuntimeUnavailable(
            f"TFLite conversion failed ({type(exc).__name__}: {str(exc)[:300]})"
        ) from None


def tflite_interpreter_class():
    """LiteRT's interpreter when the ai-edge-litert package is installed, else TensorFlow's
    own ``tf.lite.Interpreter`` (deprecated in its favour, still shipped with TensorFlow)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


def tflite_calls(content: bytes, spec: InputSpec, batch_shapes) -> dict:
    """batch size -> callable(x) -> probabilities, one allocated interpreter per size
    (raises RuntimeUnavailable if LiteRT cannot read the flatbuffer)."""
    Interpreter = tflite_interpreter_class()
    calls = {}
    for n in batch_shapes:
        try:
            interpreter = Interpreter(model_content=content)
            index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(index, [n, *spec.shape])
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError, IndexError) as exc:
            raise RuntimeUnavailable(f"LiteRT cannot run this TFLite model ({str(exc)[:300]})") from None
        output = interpreter.get_output_details()[0]["index"]

        def call(x, interpreter=interpreter, index=index, output=output):
            interpreter.set_tensor(index, np.ascontiguousarray(x, np.float32))
            interpreter.invoke()
            return interpreter.get_tensor(output)

        calls[n] = call
    return calls


def resolved_runtime(runtime: str, precision: str) -> str:
    """What ``auto`` runs: TFLite alone for an int8 version, else the hybrid."""
    if runtime == "auto":
        return "tflite" if precision == "int8" else HYBRID
    return runtime


def kept_tflite(entry: ModelEntry, runtime: str = "auto"):
    """Where the TFLite model that ``runtime`` runs alone for this version is kept
    (registry.tflite_file), or None where the runtime needs the Keras model."""
    if resolved_runtime(runtime, entry.precision) != "tflite":
        return None
    return tflite_file(entry, "int8" if entry.precision == "int8" else "float32")


def runner_from_kept(entry: ModelEntry, path, runtime: str = "auto") -> tuple[InferenceRunner | None, str]:
    """A runner on the version's kept TFLite model at ``path`` (kept_tflite), without
    importing TensorFlow; else (None, why not): a file LiteRT cannot run, to be converted
    again, or "" when none is kept and the Keras model has to be loaded. A kept model that
    runs but does not answer 7 probabilities raises RegistryError: it was converted from
    this very model.keras (its name says so), so converting again would answer the same."""
    if path is None or not path.is_file():
        return None, ""
    try:
        runner = InferenceRunner(
            None,
            entry.spec,
            runtime=runtime,
            tta=entry.tta,
            precision=entry.precision,
            flatbuffer=path.read_bytes(),
        )
    except (RuntimeUnavailable, OSError) as exc:
        return None, str(exc)
    check_answers(lambda x: runner.predict_inputs(x, "none"), entry.spec, str(path))
    return runner, ""


class InferenceRunner:
    """The one way this project runs a model: the classifier serves with it, and
    ``python -m training evaluate`` scores and times models with it.

    ``model`` is the Keras model; or None with ``flatbuffer``, the model already converted
    to TFLite in the precision asked for (registry.tflite_file), which needs no TensorFlow.
    ``flatbuffer`` holds the TFLite model the runner runs alone, else None."""

    def __init__(
        self,
        model,
        spec: InputSpec,
        batch_shapes=BATCH_SHAPES,
        runtime: str = "tf-function",
        tta: str = "none",
        precision: str = "float32",
        flatbuffer: bytes | None = None,
    ):
        if runtime not in RUNTIMES:
            raise RuntimeUnavailable(f"unknown runtime {runtime!r} (one of {', '.join(RUNTIMES)})")
        if tta not in TTA_MODES:
            raise RuntimeUnavailable(f"unknown tta {tta!r} (one of {', '.join(TTA_MODES)})")
        if precision not in PRECISIONS:
            raise RuntimeUnavailable(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
        runtime = resolved_runtime(runtime, precision)
        if model is None and (flatbuffer is None or runtime != "tflite"):
            raise RuntimeUnavailable(f"the {runtime} runtime needs the Keras model")
        # What was asked and why it was not done ("" when it was): the precision actually
        # used is self.precision.
        self.precision_fallback = precision_unavailable(runtime, precision)
        self.precision = "float32" if self.precision_fallback else precision
        self.asked_precision = precision
        self.spec = spec
        self.runtime = runtime
        self.tta = tta
        self.flatbuffer = flatbuffer
        self.fold_note = ""
        if tta == "flip":  # each face may run twice: one face is a batch of 2, not 4
            batch_shapes = {*batch_shapes, *(2 * n for n in batch_shapes)}
        self.batch_shapes = tuple(sorted(batch_shapes))
        if model is not None:
            # The same answers with less work: no training-only layers, BatchNormalization
            # folded into the convolutions (see optimize.py); fold_note says if it was not done.
            sample = np.random.default_rng(0).random((4, *spec.shape), dtype=np.float32)
            model, self.fold_note = for_inference(model, sample)
        float_model = model  # what TFLite converts: it runs float32 and int8
        if self.precision == "bfloat16":
            model = in_bfloat16(model)
        self.model = model
        if runtime == "tflite":
            if self.flatbuffer is None:
                self.flatbuffer = tflite_model(float_model, self.precision == "int8")
            calls = tflite_calls(self.flatbuffer, spec, self.batch_shapes)
            self._call = lambda x: calls[len(x)](x)
        elif runtime == HYBRID:
            self._call = self._hybrid_call(model, float_model, spec)
        else:
            self._call = compiled_call(model)

    def _hybrid_call(self, model, float_model, spec: InputSpec):
        """TFLite in float32 for small batches (a face or two per frame: a third to a half
        of the tf.function's CPU), the tf.function for larger ones (many faces: TFLite's one
        thread would fall behind); the tf.function alone if TFLite cannot convert the model."""
        compiled = compiled_call(model)
        try:
            small = tflite_calls(
                tflite_model(float_model),
                spec,
                [n for n in self.batch_shapes if n <= SMALL_BATCH],
            )
        except RuntimeUnavailable:
            self.runtime = "tf-function"
            return compiled
        return lambda x: small[len(x)](x) if len(x) in small else compiled(x)

    def warm_up(self) -> None:
        """Trace every padded shape now, so the first real batches are not slow."""
        for n in self.batch_shapes:
            self._call(np.zeros((n, *self.spec.shape), np.float32))

    def padded_size(self, n: int) -> int:
        for size in self.batch_shapes:
            if n <= size:
                return size
        return self.batch_shapes[-1]

    def predict_inputs(self, inputs: np.ndarray, tta: str | None = None) -> np.ndarray:
        """Model inputs (N, S, S, C) float32 -> probabilities (N, 7), in padded chunks,
        with the version's TTA unless ``tta`` says otherwise (flip, none or mirror)."""
        tta = self.tta if tta is None else tta
        if tta == "flip":
            return flip_averaged(self._predict_padded, inputs)
        if tta == "mirror":
            return self._predict_padded(inputs[:, :, ::-1, :])
        return self._predict_padded(inputs)

    def _predict_padded(self, inputs: np.ndarray) -> np.ndarray:
        out = []
        largest = self.batch_shapes[-1]
        for start in range(0, len(inputs), largest):
            chunk = inputs[start : start + largest]
            n = len(chunk)
            size = self.padded_size(n)
            if size != n:
                chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(self._call(chunk))[:n])
        if not out:
            return np.zeros((0, 7), np.float32)
        return np.concatenate(out)

    def predict_faces(self, faces: np.ndarray, tta: str | None = None) -> np.ndarray:
        """uint8 face crops -> probabilities, through the model's own preprocessing."""
        return self.predict_inputs(preprocess_faces(faces, self.spec), tta)
