"""Classifier: the dynamic batcher, the padded inference runner and run_batch."""

from __future__ import annotations

import time

import numpy as np
import pytest

from services.classifier.batching import Batcher, BatchPolicy, PendingFaces
from services.common.protocol import EMOTIONS, KIND_RESULT, Faces, decode
from tests.support import write_tiny_model
from tests.support.faces import CROP, pending

# --- Batcher -------------------------------------------------------------------------------


def test_defaults():
    assert BatchPolicy() == BatchPolicy(max_batch=32, max_wait_ms=5.0)


def test_empty_batcher():
    batcher = Batcher(BatchPolicy(8, 5.0))
    assert len(batcher) == 0 and batcher.crops == 0
    assert not batcher.ready(0.0) and not batcher.ready(1e9)
    assert batcher.wait_ms(0.0) is None


def test_full_batch_is_ready_at_once():
    batcher = Batcher(BatchPolicy(max_batch=8, max_wait_ms=50.0))
    batcher.add(pending(3, 10.0, seq=1))
    batcher.add(pending(4, 10.0, seq=2))
    assert batcher.crops == 7
    assert not batcher.ready(10.0)
    assert batcher.wait_ms(10.0) == pytest.approx(50.0)
    batcher.add(pending(2, 10.0, seq=3))
    assert batcher.crops == 9 and len(batcher) == 3
    assert batcher.ready(10.0)  # full: no waiting
    assert batcher.wait_ms(10.0) == 0.0
    batch = batcher.take()
    assert [item.header.seq for item in batch] == [1, 2]  # 3 + 4 = 7; adding 2 would exceed 8
    assert sum(len(item.crops) for item in batch) == 7
    assert batcher.crops == 2 and len(batcher) == 1
    assert not batcher.ready(10.0)
    assert [item.header.seq for item in batcher.take()] == [3]
    assert batcher.crops == 0 and len(batcher) == 0


def test_a_newer_frame_takes_the_place_of_one_waiting_from_the_same_stream():
    batcher = Batcher(BatchPolicy(max_batch=32, max_wait_ms=50.0))
    batcher.add(pending(2, 10.0, seq=1, stream="a"))
    batcher.add(pending(1, 10.01, seq=1, stream="b"))
    assert not batcher.replace_older(pending(1, 10.02, seq=1, stream="c"))
    assert batcher.replace_older(pending(4, 10.03, seq=2, stream="a"))
    assert batcher.crops == 5 and len(batcher) == 2
    assert batcher.wait_ms(10.03) == pytest.approx(20.0)  # its place and arrival kept
    assert [(i.header.stream, i.header.seq) for i in batcher.take()] == [("a", 2), ("b", 1)]


def test_take_fills_exactly_to_max_batch_oldest_first():
    batcher = Batcher(BatchPolicy(max_batch=8, max_wait_ms=5.0))
    for seq, n in enumerate([2, 2, 4, 1, 3], start=1):
        batcher.add(pending(n, 1.0 + seq * 0.001, seq=seq))
    assert batcher.crops == 12
    first = batcher.take()
    assert [i.header.seq for i in first] == [1, 2, 3]
    assert sum(len(i.crops) for i in first) == 8
    assert batcher.crops == 4
    second = batcher.take()
    assert [i.header.seq for i in second] == [4, 5]
    assert batcher.crops == 0


def test_take_stops_at_the_first_message_that_does_not_fit():
    # FIFO: a later small message does not jump ahead of an earlier one that did not fit
    batcher = Batcher(BatchPolicy(max_batch=8, max_wait_ms=5.0))
    for seq, n in enumerate([5, 4, 1], start=1):
        batcher.add(pending(n, 0.0, seq=seq))
    assert [i.header.seq for i in batcher.take()] == [1]
    assert [i.header.seq for i in batcher.take()] == [2, 3]


def test_timeout_path_with_explicit_clock():
    # times chosen to be exact in binary floating point, so the boundary is exact too
    batcher = Batcher(BatchPolicy(max_batch=32, max_wait_ms=62.5))
    batcher.add(pending(1, 100.0, seq=1))
    batcher.add(pending(2, 100.03125, seq=2))
    assert not batcher.ready(100.0)
    assert not batcher.ready(100.0625 - 1e-6)
    assert batcher.wait_ms(100.0) == 62.5
    assert batcher.wait_ms(100.03125) == 31.25
    assert batcher.wait_ms(100.0625 - 1e-6) == pytest.approx(0.001)
    # the oldest message decides, not the newest
    assert batcher.ready(100.0625)
    assert batcher.wait_ms(100.0625) == 0.0
    assert batcher.ready(100.07)
    assert batcher.wait_ms(100.5) == 0.0  # overdue: never negative
    batch = batcher.take()
    assert [i.header.seq for i in batch] == [1, 2]
    assert batcher.crops == 0 and not batcher.ready(200.0)
    assert batcher.wait_ms(200.0) is None


def test_timeout_restarts_from_the_next_oldest_message():
    batcher = Batcher(BatchPolicy(max_batch=4, max_wait_ms=10.0))
    batcher.add(pending(3, 0.0, seq=1))
    batcher.add(pending(3, 0.008, seq=2))
    assert batcher.ready(0.0)  # 6 >= 4 crops
    assert [i.header.seq for i in batcher.take()] == [1]
    assert not batcher.ready(0.015)  # seq 2 arrived at 8 ms: due at 18 ms
    assert batcher.wait_ms(0.015) == pytest.approx(3.0)
    assert not batcher.ready(0.0179)
    assert batcher.ready(0.0181)


def test_zero_wait_is_ready_immediately():
    batcher = Batcher(BatchPolicy(max_batch=32, max_wait_ms=0.0))
    batcher.add(pending(1, 5.0))
    assert batcher.ready(5.0)
    assert batcher.wait_ms(5.0) == 0.0


def test_message_bigger_than_max_batch_is_taken_alone():
    batcher = Batcher(BatchPolicy(max_batch=4, max_wait_ms=5.0))
    batcher.add(pending(10, 0.0, seq=1))
    batcher.add(pending(1, 0.0, seq=2))
    assert batcher.ready(0.0)
    batch = batcher.take()
    assert len(batch) == 1 and batch[0].header.seq == 1 and len(batch[0].crops) == 10
    assert batcher.crops == 1
    # and a big one behind a small one waits for its own batch
    batcher.add(pending(9, 0.0, seq=3))
    assert [i.header.seq for i in batcher.take()] == [2]
    assert [i.header.seq for i in batcher.take()] == [3]
    assert batcher.crops == 0 and len(batcher) == 0


def test_crop_counter_stays_consistent():
    rng = np.random.default_rng(5)
    batcher = Batcher(BatchPolicy(max_batch=16, max_wait_ms=2.0))
    now, seq, taken = 0.0, 0, []
    for _ in range(300):
        now += float(rng.uniform(0, 0.002))
        if rng.random() < 0.6:
            seq += 1
            batcher.add(pending(int(rng.integers(0, 20)), now, seq=seq))
        if batcher.ready(now):
            batch = batcher.take()
            assert batch
            size = sum(len(i.crops) for i in batch)
            assert size <= 16 or len(batch) == 1
            taken.extend(i.header.seq for i in batch)
        assert batcher.crops == sum(len(i.crops) for i in batcher.queue)
        assert batcher.crops >= 0
    while len(batcher):
        taken.extend(i.header.seq for i in batcher.take())
    assert batcher.crops == 0
    assert taken == list(range(1, seq + 1))  # every message once, in arrival order


# --- InferenceRunner and run_batch ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("tensorflow")
    from services.model import registry

    folder = write_tiny_model(tmp_path_factory.mktemp("registry"), "tiny-v1", seed=3)
    entry = registry.read_entry(folder)
    model = registry.load_model(entry)
    registry.check_model(model, entry.spec, str(entry.model_file))
    return entry, model


@pytest.fixture(scope="module")
def runner(tiny):
    from services.model.runtime import BATCH_SHAPES, InferenceRunner

    entry, model = tiny
    assert BATCH_SHAPES == (1, 2, 4, 8, 16, 32, 64)
    runner = InferenceRunner(model, entry.spec)
    calls = []
    inner = runner._call

    def recording(x):
        calls.append(tuple(np.shape(x)))
        return inner(x)

    runner._call = recording
    runner.calls = calls
    return runner


def test_padded_sizes(runner):
    assert runner.batch_shapes == (1, 2, 4, 8, 16, 32, 64)
    expected = {
        1: 1,
        2: 2,
        3: 4,
        4: 4,
        5: 8,
        8: 8,
        9: 16,
        16: 16,
        17: 32,
        32: 32,
        33: 64,
        63: 64,
        64: 64,
        65: 64,
        500: 64,
    }
    assert {n: runner.padded_size(n) for n in expected} == expected


def test_warm_up_traces_every_shape(runner):
    runner.calls.clear()
    runner.warm_up()
    assert runner.calls == [(n, 48, 48, 1) for n in (1, 2, 4, 8, 16, 32, 64)]


@pytest.mark.parametrize(
    "n,chunks", [(0, []), (1, [1]), (3, [4]), (5, [8]), (12, [16]), (64, [64]), (70, [64, 8])]
)
def test_probabilities_match_the_model(runner, tiny, n, chunks):
    _, model = tiny
    rng = np.random.default_rng(n)
    inputs = rng.random((n, 48, 48, 1), dtype=np.float32)
    runner.calls.clear()
    probabilities = runner.predict_inputs(inputs)
    assert runner.calls == [(size, 48, 48, 1) for size in chunks]
    assert probabilities.shape == (n, 7)
    if n == 0:
        return
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    direct = np.asarray(model(inputs, training=False))
    np.testing.assert_allclose(probabilities, direct, rtol=1e-5, atol=1e-6)
    # different inputs give different answers (the model is not constant)
    assert n == 1 or np.ptp(probabilities[:, 0]) > 0


def test_predict_faces_uses_the_model_preprocessing(runner, tiny):
    from services.model.preprocess import preprocess_faces

    entry, model = tiny
    faces = np.random.default_rng(1).integers(0, 256, (3, 96, 96, 3), np.uint8)
    expected = np.asarray(model(preprocess_faces(faces, entry.spec), training=False))
    np.testing.assert_allclose(runner.predict_faces(faces), expected, rtol=1e-5, atol=1e-6)


def test_run_batch_one_result_per_message(runner):
    from services.classifier.service import results_message, run_batch

    rng = np.random.default_rng(2)
    sizes = [2, 0, 3, 1]
    batch = []
    for seq, n in enumerate(sizes):
        item = pending(n, arrived=50.0, seq=seq, stream=f"cam{seq % 2}")
        item.crops[:] = rng.integers(0, 256, item.crops.shape, np.uint8)
        batch.append(item)
    all_crops = np.concatenate([item.crops for item in batch])
    expected = runner.predict_faces(all_crops)
    labels = [EMOTIONS[i] for i in expected.argmax(axis=1)]
    assert len(set(map(tuple, np.round(expected, 6)))) > 1

    messages = run_batch(batch, runner, "tiny-v1", now=50.01)
    assert len(messages) == len(batch)
    start = 0
    for item, parts in zip(batch, messages):
        assert parts[0] == item.header.stream.encode()
        header, payloads = decode([bytes(p) for p in parts], expect_kind=KIND_RESULT)
        assert payloads == []
        n = len(item.crops)
        assert (header.stream, header.seq, header.width, header.height) == (
            item.header.stream,
            item.header.seq,
            640,
            480,
        )
        assert header.model == "tiny-v1"
        assert header.boxes == item.header.boxes
        assert [r.box for r in header.results] == item.header.boxes
        assert [r.label for r in header.results] == labels[start : start + n]
        for r, row in zip(header.results, expected[start : start + n]):
            assert r.scores == pytest.approx(row.tolist(), abs=1e-6)
            assert r.confidence == pytest.approx(float(row.max()), abs=1e-6)
            assert r.label == EMOTIONS[int(np.argmax(r.scores))]
        assert header.timestamps["capture"] == item.header.timestamps["capture"]
        assert "classify" in header.timestamps
        start += n
    assert start == len(all_crops)

    # the classifier's answer for a frame without faces is also a valid result message
    empty = pending(0, 0.0, seq=9)
    header, _ = decode(results_message(empty.header, np.zeros((0, 7)), "tiny-v1"), expect_kind=KIND_RESULT)
    assert header.results == [] and header.boxes == [] and header.seq == 9


def test_run_batch_with_crops_of_different_sizes(runner):
    """Detectors with different --crop-size feed one classifier: one batch, right answers."""
    from services.classifier.service import run_batch

    rng = np.random.default_rng(5)
    batch = []
    for seq, (n, size) in enumerate([(2, CROP), (1, 16), (3, 200)]):
        item = pending(n, arrived=50.0, seq=seq)
        item.header.crop_size = size
        item.crops = rng.integers(0, 256, (n, size, size, 3), np.uint8)
        batch.append(item)
    runner.calls.clear()
    messages = run_batch(batch, runner, "tiny-v1", now=50.01)
    assert runner.calls == [(8, 48, 48, 1)]  # still a single model call
    for item, parts in zip(batch, messages):
        header, _ = decode([bytes(p) for p in parts], expect_kind=KIND_RESULT)
        expected = runner.predict_faces(item.crops)
        np.testing.assert_allclose([r.scores for r in header.results], expected, atol=1e-5)


def test_results_message_labels_are_argmax():
    from services.classifier.service import results_message

    header = pending(2, 0.0, seq=4).header
    probabilities = np.array(
        [[0.05, 0.05, 0.1, 0.6, 0.1, 0.05, 0.05], [0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.7]], np.float32
    )
    got, _ = decode(results_message(header, probabilities, "m1"), expect_kind=KIND_RESULT)
    assert [r.label for r in got.results] == ["Happy", "Neutral"]
    assert [r.confidence for r in got.results] == pytest.approx([0.6, 0.7])
    assert got.model == "m1" and got.boxes == header.boxes


def test_load_entry(tiny, tmp_path):
    from services.classifier.serving import load_entry
    from services.model import registry

    entry, _ = tiny
    by_dir = load_entry("unused", str(entry.path))
    by_file = load_entry("unused", str(entry.model_file))
    assert by_dir.version == by_file.version == "tiny-v1"
    with pytest.raises(registry.RegistryError):
        load_entry("unused", str(tmp_path / "missing" / "model.keras"))
    with pytest.raises(registry.RegistryError):
        load_entry(str(tmp_path), "")  # nothing promoted there
    registry.promote(entry.path.parent, "tiny-v1")
    assert load_entry(str(entry.path.parent), "").version == "tiny-v1"


# --- the TFLite runtime --------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 70])
def test_tflite_runtime_gives_the_models_answers(tiny, n):
    from services.model.runtime import InferenceRunner

    entry, model = tiny
    lite = InferenceRunner(model, entry.spec, runtime="tflite")
    lite.warm_up()
    inputs = np.random.default_rng(n).random((n, 48, 48, 1), dtype=np.float32)
    np.testing.assert_allclose(
        lite.predict_inputs(inputs), np.asarray(model(inputs, training=False)), rtol=1e-4, atol=1e-5
    )


def test_unknown_or_failing_runtime_is_a_clear_model_error(tiny, monkeypatch):
    from services.classifier import serving
    from services.model import registry, runtime

    entry, model = tiny
    with pytest.raises(runtime.RuntimeUnavailable, match="unknown runtime 'onnx'"):
        runtime.InferenceRunner(model, entry.spec, runtime="onnx")

    def failing(_model, int8=False):
        raise runtime.RuntimeUnavailable("TFLite conversion failed (ConverterError: op X)")

    monkeypatch.setattr(runtime, "tflite_model", failing)
    with pytest.raises(registry.RegistryError) as err:
        serving.load_served_model(entry, "tflite")
    assert str(entry.model_file) in str(err.value) and "--runtime tflite" in str(err.value)
    assert "op X" in str(err.value)


# --- flip test-time augmentation, a property of the model version ---------------------------


@pytest.mark.parametrize("n", [1, 40])
def test_flip_tta_averages_each_face_with_its_mirror_image(tiny, n):
    from services.model.runtime import InferenceRunner

    entry, model = tiny
    inputs = np.random.default_rng(n).random((n, 48, 48, 1), dtype=np.float32)
    plain = np.asarray(model(inputs, training=False))
    mirrored = np.asarray(model(inputs[:, :, ::-1, :].copy(), training=False))
    runner = InferenceRunner(model, entry.spec, tta="flip")
    shapes, inner = [], runner._call
    runner._call = lambda x: shapes.append(len(x)) or inner(x)
    flip = runner.predict_inputs(inputs)
    np.testing.assert_allclose(flip, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(flip, plain)
    # every face and its mirror image in one padded call: one face is a batch of 2
    assert runner.batch_shapes == (1, 2, 4, 8, 16, 32, 64, 128)
    assert shapes == [2 if n == 1 else 128]
    # a caller may ask for one view (live streams): as is or mirrored, one face a batch of 1
    shapes.clear()
    np.testing.assert_allclose(runner.predict_inputs(inputs, tta="none"), plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runner.predict_inputs(inputs, tta="mirror"), mirrored, rtol=1e-5, atol=1e-6)
    assert shapes == [1 if n == 1 else 64] * 2


def test_live_streams_alternate_as_is_and_mirrored_and_jobs_keep_the_versions_tta(tiny):
    from services.classifier.live_tta import LiveTta
    from services.classifier.service import run_batch
    from services.model.runtime import InferenceRunner

    entry, model = tiny
    runner = InferenceRunner(model, entry.spec, tta="flip")
    rng = np.random.default_rng(5)
    crops = {stream: rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8) for stream in ("cam", "job:clip")}

    def scores(live_tta, seq=1):
        batch = [
            PendingFaces(
                Faces(
                    stream=stream,
                    seq=seq,
                    width=64,
                    height=64,
                    timestamps={"capture": time.time()},
                    boxes=[(0, 0, 8, 8), (8, 8, 8, 8)],
                    crop_size=48,
                ),
                crops[stream],
                0.0,
            )
            for stream in crops
        ]
        messages = run_batch(batch, runner, "tiny-flip", now=0.0, live_tta=live_tta)
        return {decode(m)[0].stream: np.array([r.scores for r in decode(m)[0].results]) for m in messages}

    flip = {stream: runner.predict_faces(crops[stream]) for stream in crops}
    plain = {stream: runner.predict_faces(crops[stream], "none") for stream in crops}
    mirrored = {stream: runner.predict_faces(crops[stream][:, :, ::-1].copy(), "none") for stream in crops}
    assert not np.allclose(flip["cam"], plain["cam"])
    assert not np.allclose(plain["cam"], mirrored["cam"])
    np.testing.assert_allclose((plain["cam"] + mirrored["cam"]) / 2, flip["cam"], atol=1e-5)

    def check(got, cam):
        np.testing.assert_allclose(got["cam"], cam, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["job:clip"], flip["job:clip"], rtol=1e-4, atol=1e-5)

    alternate = LiveTta("alternate", "flip")
    for seq, cam in enumerate([plain, mirrored, plain, mirrored]):
        check(scores(alternate, seq), cam["cam"])
    check(scores(LiveTta("none", "flip")), plain["cam"])
    check(scores(LiveTta("version", "flip")), flip["cam"])
    check(scores(None), flip["cam"])
    # a version without TTA is run as is, whatever --live-tta says
    assert LiveTta("alternate", "none")(Faces(stream="cam", seq=1, width=8, height=8)) is None


def test_a_versions_tta_comes_from_its_metadata_and_bad_values_are_named(tiny, tmp_path):
    import json
    import shutil

    from services.classifier import serving
    from services.model import registry, runtime

    entry, model = tiny
    assert entry.tta == "none" and serving.load_served_model(entry).runner.tta == "none"
    folder = tmp_path / "tiny-flip"
    shutil.copytree(entry.path, folder)
    meta = json.loads((folder / registry.METADATA_FILE).read_text())
    (folder / registry.METADATA_FILE).write_text(json.dumps({**meta, "tta": "flip"}))
    assert serving.load_served_model(registry.read_entry(folder)).runner.tta == "flip"
    (folder / registry.METADATA_FILE).write_text(json.dumps({**meta, "tta": "five-crop"}))
    with pytest.raises(registry.RegistryError, match=r"metadata.json: 'tta' is 'five-crop'"):
        serving.load_served_model(registry.read_entry(folder))
    with pytest.raises(runtime.RuntimeUnavailable, match="unknown tta 'rotate'"):
        runtime.InferenceRunner(model, entry.spec, tta="rotate")


# --- bfloat16, a property of the model version ---------------------------------------------


def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path):
    from services.model import runtime

    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert runtime.native_bfloat16(str(with_bf16))
    assert not runtime.native_bfloat16(str(without))
    assert not runtime.native_bfloat16(str(tmp_path / "absent"))
    assert runtime.precision_unavailable("tf-function", "bfloat16", str(with_bf16)) == ""
    assert "no native bfloat16" in runtime.precision_unavailable("tf-function", "bfloat16", str(without))
    assert "float32 and int8 models only" in runtime.precision_unavailable(
        "tflite", "bfloat16", str(with_bf16)
    )
    assert runtime.precision_unavailable("tflite", "int8") == ""
    assert "TFLite only" in runtime.precision_unavailable("tf-function", "int8")


def test_bfloat16_gives_the_float32_answers_to_bfloat16_resolution(tiny):
    from services.model import runtime

    if not runtime.native_bfloat16():
        pytest.skip("this CPU has no native bfloat16; the fallback is tested below")
    entry, model = tiny
    inputs = np.random.default_rng(5).random((70, 48, 48, 1), dtype=np.float32)
    f32 = runtime.InferenceRunner(model, entry.spec).predict_inputs(inputs)
    bf16 = runtime.InferenceRunner(model, entry.spec, precision="bfloat16")
    assert bf16.precision == "bfloat16" and bf16.precision_fallback == ""
    out = bf16.predict_inputs(inputs)
    assert out.dtype == np.float32 and out.shape == (70, 7)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)  # a float32 softmax
    np.testing.assert_allclose(out, f32, atol=0.03)
    assert not np.array_equal(out, f32)  # it did compute in bfloat16
    # the weights stay float32; only the arithmetic is bfloat16
    assert all(w.dtype == "float32" for w in bf16.model.weights)
    assert bf16.model.layers[-1].compute_dtype == "float32"


def test_bfloat16_falls_back_to_float32_where_the_cpu_would_emulate_it(tiny, monkeypatch):
    from services.classifier import serving
    from services.model import runtime

    entry, model = tiny
    monkeypatch.setattr(runtime, "native_bfloat16", lambda cpuinfo="": False)
    runner = runtime.InferenceRunner(model, entry.spec, precision="bfloat16")
    assert runner.precision == "float32" and "no native bfloat16" in runner.precision_fallback
    assert runner.model.compute_dtype == "float32"
    served = serving.ServedModel("tiny-bf16", runner, "model.keras")
    assert "precision float32 (the version asks for bfloat16, but this CPU has no native" in serving.describe(
        served
    )
    with pytest.raises(runtime.RuntimeUnavailable, match="unknown precision 'float16'"):
        runtime.InferenceRunner(model, entry.spec, precision="float16")


def test_a_versions_precision_comes_from_its_metadata_and_bad_values_are_named(tiny, tmp_path):
    import json
    import shutil

    from services.classifier import serving
    from services.model import registry, runtime

    entry, _ = tiny
    assert entry.precision == "float32"
    folder = tmp_path / "tiny-bf16"
    shutil.copytree(entry.path, folder)
    meta = json.loads((folder / registry.METADATA_FILE).read_text())
    (folder / registry.METADATA_FILE).write_text(json.dumps({**meta, "precision": "bfloat16"}))
    runner = serving.load_served_model(registry.read_entry(folder)).runner
    assert runner.precision == ("bfloat16" if runtime.native_bfloat16() else "float32")
    assert serving.load_served_model(registry.read_entry(folder), "tflite").runner.precision == "float32"
    (folder / registry.METADATA_FILE).write_text(json.dumps({**meta, "precision": "int8"}))
    int8 = serving.load_served_model(registry.read_entry(folder)).runner
    assert (int8.runtime, int8.precision) == ("tflite", "int8")
    (folder / registry.METADATA_FILE).write_text(json.dumps({**meta, "precision": "int4"}))
    with pytest.raises(registry.RegistryError, match=r"metadata.json: 'precision' is 'int4'"):
        serving.load_served_model(registry.read_entry(folder))


def test_bfloat16_under_auto_runs_small_batches_in_float32_on_tflite(tiny):
    """TFLite's one thread costs less CPU per face than the bfloat16 tf.function at small
    batches, so auto keeps it there; the larger batches compute in bfloat16."""
    from services.classifier import serving
    from services.model import runtime

    if not runtime.native_bfloat16():
        pytest.skip("this CPU has no native bfloat16")
    entry, model = tiny
    runner = runtime.InferenceRunner(model, entry.spec, runtime="auto", precision="bfloat16")
    assert runner.runtime == runtime.HYBRID and runner.precision == "bfloat16"
    f32 = runtime.InferenceRunner(model, entry.spec, runtime="tflite")
    small = np.random.default_rng(6).random((2, 48, 48, 1), dtype=np.float32)
    np.testing.assert_allclose(runner.predict_inputs(small), f32.predict_inputs(small), atol=1e-5)
    text = serving.describe(serving.ServedModel("tiny-bf16", runner, "model.keras"))
    assert "precision bfloat16 above 8 model inputs (float32 on TFLite up to there)" in text


# --- int8: weights quantised for LiteRT ------------------------------------------------------


def test_int8_runs_quantised_weights_on_tflite_close_to_float32(tiny):
    from services.model import runtime

    entry, model = tiny
    inputs = np.random.default_rng(7).random((20, 48, 48, 1), dtype=np.float32)
    f32 = runtime.InferenceRunner(model, entry.spec, runtime="tflite").predict_inputs(inputs)
    int8 = runtime.InferenceRunner(model, entry.spec, runtime="auto", precision="int8")
    assert (int8.runtime, int8.precision, int8.precision_fallback) == ("tflite", "int8", "")
    out = int8.predict_inputs(inputs)
    assert out.shape == (20, 7) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(out, f32, atol=0.05)
    assert not np.array_equal(out, f32)  # it did run the quantised weights
    f32_size = len(runtime.tflite_model(int8.model))
    assert len(runtime.tflite_model(int8.model, int8=True)) < f32_size  # int8 weights


def test_int8_on_the_tf_function_runtime_falls_back_to_float32_and_says_why(tiny):
    from services.classifier import serving
    from services.model import runtime

    entry, model = tiny
    runner = runtime.InferenceRunner(model, entry.spec, runtime="tf-function", precision="int8")
    assert runner.precision == "float32" and "TFLite only" in runner.precision_fallback
    text = serving.describe(serving.ServedModel("tiny-int8", runner, "model.keras"))
    assert "precision float32 (the version asks for int8, but int8 weights run on TFLite only" in text


@pytest.fixture
def int8_version(tiny, tmp_path):
    import json
    import shutil

    from services.model import registry

    entry, _ = tiny
    folder = tmp_path / "tiny-int8"
    shutil.copytree(entry.path, folder)
    meta = json.loads((folder / registry.METADATA_FILE).read_text())
    (folder / registry.METADATA_FILE).write_text(json.dumps({**meta, "precision": "int8"}))
    return registry.read_entry(folder)


def test_an_int8_version_keeps_its_tflite_model_and_then_starts_without_tensorflow(int8_version):
    import subprocess
    import sys

    from services.classifier import serving
    from services.model import registry
    from tests.support.paths import ROOT

    kept = registry.tflite_file(int8_version, "int8")
    assert not kept.exists()
    first = serving.load_served_model(int8_version)
    assert kept.is_file() and kept.read_bytes() == first.runner.flatbuffer
    assert first.source == str(int8_version.model_file)
    probe = (
        "import sys; from services.classifier import serving; from services.model import registry\n"
        f"served = serving.load_served_model(registry.read_entry({str(int8_version.path)!r}))\n"
        "import numpy as np\n"
        "p = served.runner.predict_inputs(np.full((3, 48, 48, 1), 0.5, np.float32))\n"
        "print(served.source, served.runner.runtime, served.runner.precision, p.shape,\n"
        "      'tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(kept), "tflite", "int8", "(3,", "7)", "False", "False"]


def test_a_corrupt_or_stale_tflite_model_is_converted_again(int8_version, caplog):
    from services.classifier import serving
    from services.model import registry

    kept = registry.tflite_file(int8_version, "int8")
    kept.write_bytes(b"TFL3 not a model")
    served = serving.load_served_model(int8_version)
    assert served.source == str(int8_version.model_file)  # converted from model.keras
    assert "not used, converting model.keras again" in caplog.text and str(kept) in caplog.text
    assert kept.read_bytes() == served.runner.flatbuffer  # replaced by the good one
    # another model.keras is another digest: the old flatbuffer is never met
    with int8_version.model_file.open("ab") as f:
        f.write(b"\0")
    assert registry.tflite_file(int8_version, "int8") != kept


def test_a_version_folder_that_cannot_be_written_is_served_all_the_same(int8_version, monkeypatch, caplog):
    """A read-only registry (a mounted volume, an image layer) costs each start a conversion."""
    from services.classifier import serving
    from services.model import registry

    def refuse(path, content):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(registry, "atomic_write", refuse)
    caplog.set_level("INFO")
    served = serving.load_served_model(int8_version)
    assert (served.runner.runtime, served.runner.precision) == ("tflite", "int8")
    assert not registry.tflite_file(int8_version, "int8").exists()
    assert f"{int8_version.path}: cannot keep the TFLite model there (Permission denied)" in caplog.text
    assert "the next start converts it again" in caplog.text


# --- the inference copy: training-only layers dropped, BatchNormalization folded -------------


def _trained_looking(model):
    """Give every BatchNormalization statistics far from the identity, as training does."""
    rng = np.random.default_rng(11)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            n = layer.gamma.shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 2, n), rng.normal(0, 0.5, n), rng.normal(0, 0.5, n), rng.uniform(0.2, 3, n)]
            )
    return model


def test_folding_drops_training_layers_and_keeps_the_answers():
    pytest.importorskip("tensorflow")
    from services.model.optimize import fold_for_inference, for_inference
    from training.models import compact

    model = _trained_looking(compact(width=0.125, seed=1))
    lean = fold_for_inference(model)
    kinds = {type(layer).__name__ for layer in lean.layers}
    assert not kinds & {"BatchNormalization", "Dropout", "Sequential"}, kinds
    assert {type(layer).__name__ for layer in model.layers} >= {"BatchNormalization", "Sequential"}
    assert lean.get_layer("stem1_conv").use_bias and not model.get_layer("stem1_conv").use_bias
    x = np.random.default_rng(2).random((16, 48, 48, 1), dtype=np.float32)
    np.testing.assert_allclose(
        np.asarray(lean(x, training=False)), np.asarray(model(x, training=False)), atol=1e-5
    )
    served, note = for_inference(model, x[:4])
    assert served is not model and note == ""


def test_a_convolution_with_other_consumers_keeps_its_batchnorm():
    keras = pytest.importorskip("keras")
    from services.model.optimize import fold_for_inference

    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="shared")(inputs)
    y = keras.layers.Add()([keras.layers.BatchNormalization(name="bn")(x), keras.layers.ReLU()(x)])
    z = keras.layers.Dropout(0.5)(keras.layers.GlobalAveragePooling2D()(y))
    model = _trained_looking(keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(z)))
    lean = fold_for_inference(model)
    names = [layer.name for layer in lean.layers]
    assert "bn" in names and not lean.get_layer("shared").use_bias
    assert not any(type(layer).__name__ == "Dropout" for layer in lean.layers)
    x = np.random.default_rng(3).random((5, 8, 8, 2), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(lean(x)), np.asarray(model(x)), atol=1e-6)


def test_a_fold_that_changes_the_answers_is_not_served(tiny, monkeypatch):
    from services.model import optimize
    from training.models import compact

    model = _trained_looking(compact(width=0.125, seed=1))
    x = np.random.default_rng(4).random((4, 48, 48, 1), dtype=np.float32)
    # a Sequential model is served as it is, without a note
    entry, tiny_model = tiny
    assert optimize.for_inference(tiny_model, x) == (tiny_model, "")
    real = optimize._folded_weights
    monkeypatch.setattr(optimize, "_folded_weights", lambda conv, bn: [w * 1.5 for w in real(conv, bn)])
    served, note = optimize.for_inference(model, x)
    assert served is model and "folding changed the answers" in note
    monkeypatch.setattr(optimize, "fold_for_inference", lambda m: 1 / 0)
    served, note = optimize.for_inference(model, x)
    assert served is model and "served unfolded (ZeroDivisionError" in note


def test_auto_runtime_uses_tflite_for_small_batches_only(tiny, monkeypatch):
    from services.classifier import serving
    from services.model import runtime

    entry, model = tiny
    runner = serving.load_served_model(entry).runner
    assert runner.runtime == runtime.HYBRID
    inputs = np.random.default_rng(5).random((70, 48, 48, 1), dtype=np.float32)
    for n in (1, 3, 70):
        np.testing.assert_allclose(
            runner.predict_inputs(inputs[:n]),
            np.asarray(model(inputs[:n], training=False)),
            rtol=1e-4,
            atol=1e-5,
        )

    def failing(_model):
        raise runtime.RuntimeUnavailable("TFLite conversion failed (ConverterError: op X)")

    monkeypatch.setattr(runtime, "tflite_model", failing)
    assert serving.load_served_model(entry, "auto").runner.runtime == "tf-function"


def test_live_tta_forgets_streams_that_went_silent():
    from services.classifier.live_tta import LiveTta

    now = [0.0]
    alternate = LiveTta("alternate", "flip", clock=lambda: now[0])
    for i in range(100):
        header = Faces(f"cam-{i}", 0, 64, 64, {}, boxes=[], crop_size=CROP)
        assert alternate(header) == "none" and alternate(header) == "mirror"
        now[0] += 1.0
        alternate.forget_silent(5.0)
    assert len(alternate.mirrored) == 5
    now[0] += 10
    alternate.forget_silent(5.0)
    assert alternate.mirrored == {} and alternate.forgotten == 100


def test_the_committed_tiny_registry_serves_from_its_kept_tflite_model():
    """tests/fixtures/tiny-registry stays whole: its flatbuffer belongs to its model.keras."""
    from services.model import registry
    from services.model.runtime import kept_tflite, runner_from_kept
    from tests.support import TINY_REGISTRY

    entry = registry.read_entry(TINY_REGISTRY / "test-v1")
    runner, problem = runner_from_kept(entry, kept_tflite(entry))
    assert runner is not None, problem or "no kept TFLite model: run python -m tests.support.models"
    assert (runner.runtime, runner.precision) == ("tflite", "int8")


def test_a_kept_tflite_model_that_answers_wrongly_rejects_the_version_without_converting(tmp_path):
    """Named by its model.keras, it answers what that model answers: no second conversion."""
    from services.classifier import serving
    from services.model import registry
    from services.model.runtime import kept_tflite

    folder = write_tiny_model(tmp_path, "five", outputs=5, precision="int8", keep_tflite=True)
    entry = registry.read_entry(folder)
    kept = kept_tflite(entry)
    with pytest.raises(registry.RegistryError, match=r"model-int8-.*\.tflite: model output shape \(5,\)"):
        serving.load_served_model(entry)
    assert kept.is_file()  # not removed, as a file LiteRT cannot run would be
    with pytest.raises(registry.RegistryError, match="output shape"):
        registry.check_servable(entry)
