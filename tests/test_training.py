"""The training CLI on tiny synthetic data: data formats and their errors, metrics,
train -> evaluate -> registry, resume, promote/rollback, atomic registration."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.usefixtures("eager_tensorflow")

from services.common.protocol import EMOTIONS  # noqa: E402
from services.model import registry  # noqa: E402
from services.model.preprocess import InputSpec, preprocess_faces  # noqa: E402
from services.model.runtime import InferenceRunner  # noqa: E402
from training import data, evaluate, models, train  # noqa: E402
from training.cli import main  # noqa: E402
from training.data import DataError  # noqa: E402

HEADER = "emotion,pixels,Usage\n"


def pixels(seed: int, n: int = 48 * 48) -> str:
    return " ".join(map(str, np.random.default_rng(seed).integers(0, 256, n)))


def write_csv(path: Path, rows: list[tuple]) -> Path:
    path.write_text(HEADER + "".join(f"{e},{p},{u}\n" for e, p, u in rows))
    return path


def fer_csv(path: Path, per_split=(70, 14, 14)) -> Path:
    rows = []
    for usage, count in zip(data.SPLITS, per_split):
        rows += [(i % 7, pixels(i), usage) for i in range(count)]
    return write_csv(path, rows)


def write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def tiny_model(outputs: int = 7, size: int = 8):
    inputs = keras.Input((size, size, 1))
    x = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, keras.layers.Dense(outputs, activation="softmax")(x))


def make_version(root: Path, version: str, outputs: int = 7) -> Path:
    folder = root / version
    folder.mkdir(parents=True)
    tiny_model(outputs).save(folder / registry.MODEL_FILE)
    meta = {"version": version, "input": InputSpec(8, 1, "unit").to_dict(), "classes": list(EMOTIONS)}
    (folder / registry.METADATA_FILE).write_text(json.dumps(meta))
    return folder


# --- CSV -----------------------------------------------------------------------------


def test_csv_splits_and_shapes(tmp_path):
    ds = data.load_dataset(fer_csv(tmp_path / "fer.csv"))
    assert ds.format == "csv" and ds.sizes() == {"Training": 70, "PublicTest": 14, "PrivateTest": 14}
    train_split = ds.split("Training")
    assert train_split.faces.shape == (70, 48, 48) and train_split.faces.dtype == np.uint8
    assert train_split.labels[:8].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    expected = np.array(pixels(0).split(), np.uint8).reshape(48, 48)
    np.testing.assert_array_equal(train_split.faces[0], expected)


def test_csv_accepts_spaced_header_and_quoted_pixels(tmp_path):
    path = tmp_path / "fer.csv"
    path.write_text(f'emotion, pixels, Usage\n3,"{pixels(1)}",Training\n')
    assert data.load_dataset(path).sizes()["Training"] == 1


@pytest.mark.parametrize(
    "rows, message",
    [
        ([(0, pixels(0, 2303), "Training")], ":2: 2303 pixel values, expected 2304"),
        (
            [(0, pixels(0), "Training"), (0, pixels(0)[:-3] + " 1x", "Training")],
            ":3: pixel value '1x' is not an integer",
        ),
        ([(7, pixels(0), "Training")], ":2: emotion 7 outside 0..6"),
        ([("happy", pixels(0), "Training")], ":2: emotion 'happy' is not an integer"),
        ([(1, pixels(0), "Train")], ":2: unknown Usage 'Train'"),
        (
            [(1, pixels(0).replace("1", "300", 1) if "1" in pixels(0) else "300 " * 2304, "Training")],
            "pixel values must be 0..255",
        ),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, rows, message):
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError) as err:
        data.load_dataset(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_csv_missing_columns_empty_and_missing_split(tmp_path):
    path = tmp_path / "cols.csv"
    path.write_text(f"emotion,pixels\n0,{pixels(0)}\n")
    with pytest.raises(DataError, match=r"cols.csv:1: missing column\(s\) Usage"):
        data.load_dataset(path)
    empty = tmp_path / "empty.csv"
    empty.write_text(HEADER)
    with pytest.raises(DataError, match="empty.csv: empty dataset"):
        data.load_dataset(empty)
    only_train = write_csv(tmp_path / "train.csv", [(0, pixels(0), "Training")])
    with pytest.raises(DataError, match="train.csv: split 'PrivateTest' has no rows"):
        data.load_dataset(only_train).split("PrivateTest")
    with pytest.raises(DataError, match="no such file"):
        data.load_dataset(tmp_path / "nope.csv")


# --- image folders -------------------------------------------------------------------


def test_index_folders_with_split_dirs_and_any_image_kind(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        for label in range(7):
            for i in range(n):
                write_image(
                    tmp_path / split / str(label) / f"{i}.png", rng.integers(0, 256, (48, 48), np.uint8)
                )
    # colour, other size, BGRA and 16-bit images mix with the grey ones
    write_image(tmp_path / "train" / "3" / "colour.jpg", rng.integers(0, 256, (64, 50, 3), np.uint8))
    write_image(tmp_path / "train" / "4" / "alpha.png", rng.integers(0, 256, (20, 20, 4), np.uint8))
    write_image(tmp_path / "train" / "5" / "deep.png", rng.integers(0, 65536, (30, 30), np.uint16))
    (tmp_path / "train" / "5" / "notes.txt").write_text("not an image, ignored")
    ds = data.load_dataset(tmp_path)
    assert ds.format == "folders" and ds.sizes() == {"Training": 24, "PublicTest": 7, "PrivateTest": 7}
    train_split = ds.split("Training")
    assert isinstance(train_split.faces, list)  # mixed sizes stay a list
    assert np.bincount(train_split.labels).tolist() == [3, 3, 3, 4, 4, 4, 3]
    x = data.model_inputs(train_split.faces, InputSpec(48, 1, "unit"))
    assert x.shape == (24, 48, 48, 1) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    rgb = data.model_inputs(train_split.faces, InputSpec(32, 3, "symmetric"))
    assert rgb.shape == (24, 32, 32, 3) and -1 <= rgb.min() and rgb.max() <= 1
    shutil.rmtree(tmp_path / "val")  # no validation folder: a stratified part of train
    carved = data.load_dataset(tmp_path, val_fraction=0.25)
    assert carved.sizes() == {"Training": 17, "PublicTest": 7, "PrivateTest": 7}


def test_name_folders_aliases_skip_unknown_and_val_fraction(tmp_path, caplog):
    rng = np.random.default_rng(1)
    names = ["Angry", "disgusted", "FEAR", "happiness", "sad", "surprised", "neutral", "contempt"]
    for name in names:
        for i in range(10):
            write_image(tmp_path / name / f"{i}.jpg", rng.integers(0, 256, (40, 40, 3), np.uint8))
    with caplog.at_level(logging.WARNING):
        ds = data.load_dataset(tmp_path, val_fraction=0.2, seed=3)
    assert "contempt" in caplog.text
    assert ds.sizes() == {"Training": 56, "PublicTest": 14}
    assert ds.split("PublicTest").counts() == [2] * 7
    assert isinstance(ds.split("Training").faces, np.ndarray)
    again = data.load_dataset(tmp_path, val_fraction=0.2, seed=3)
    np.testing.assert_array_equal(again.split("PublicTest").faces, ds.split("PublicTest").faces)
    assert data.class_index("Anger") == 0 and data.class_index("6") == 6 and data.class_index("7") is None


def test_folder_errors_name_the_file_or_folder(tmp_path):
    write_image(tmp_path / "a" / "happy" / "ok.png", np.zeros((8, 8), np.uint8))
    broken = tmp_path / "a" / "happy" / "broken.png"
    broken.write_bytes(b"not really a png")
    with pytest.raises(DataError, match=f"{broken}: cannot be read as an image"):
        data.load_dataset(tmp_path / "a")
    (tmp_path / "b" / "sad").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{tmp_path / 'b' / 'sad'}: empty class folder"):
        data.load_dataset(tmp_path / "b")
    (tmp_path / "c" / "contempt").mkdir(parents=True)
    with pytest.raises(DataError, match="empty dataset"):
        data.load_dataset(tmp_path / "c")
    with pytest.raises(DataError, match="is a directory"):
        data.load_dataset(tmp_path / "c", "csv")


# --- balancing, batches, metrics -----------------------------------------------------


def test_balancing():
    labels = np.array([0] * 6 + [1] * 2 + [3] * 3)
    idx = data.oversample_indices(labels, seed=0)
    assert np.bincount(labels[idx]).tolist() == [6, 6, 0, 6]
    np.testing.assert_array_equal(np.sort(idx), data.oversample_indices(labels, seed=0))
    weights = data.balanced_class_weights(labels)
    np.testing.assert_allclose(weights[[0, 1, 3]], [11 / 18, 11 / 6, 11 / 9])
    assert weights[2] == 1.0


def test_batches_are_preprocess_faces_output_and_order_depends_on_seed_and_epoch():
    faces = np.random.default_rng(0).integers(0, 256, (10, 48, 48), np.uint8)
    split = data.Split(faces, np.arange(10) % 7)
    spec = InputSpec(48, 1, "unit")
    plain = train.Batches(split, spec, 4)
    x, y = plain[0]
    np.testing.assert_array_equal(x, preprocess_faces(faces[:4], spec))
    assert y.shape == (4, 7) and y.argmax(1).tolist() == [0, 1, 2, 3]
    soft = np.random.default_rng(1).dirichlet(np.ones(7), 10).astype(np.float32)
    np.testing.assert_array_equal(train.Batches(split, spec, 4, targets=soft)[2][1], soft[8:])
    a = train.Batches(split, spec, 4, shuffle=True, seed=1, epoch=5, class_weights=np.arange(7.0))
    b = train.Batches(split, spec, 4, shuffle=True, seed=1, epoch=5)
    np.testing.assert_array_equal(a[1][0], b[1][0])
    xa, ya, wa = a[2]
    assert len(a) == 3 and len(xa) == 2 and wa.tolist() == ya.argmax(1).tolist()
    b.on_epoch_end()
    assert not np.array_equal(a[0][0], b[0][0])


def test_metrics_match_hand_computation():
    y_true = [0, 0, 1, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 2, 2]
    cm = evaluate.confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]
    m = evaluate.metrics_from_confusion(cm, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6) and m["n"] == 6
    assert m["per_class"]["b"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    f1 = [2 / 3, 2 / 3, 2 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    empty = evaluate.metrics_from_confusion(evaluate.confusion_matrix([], [], 7))
    assert empty["accuracy"] == 0.0 and empty["per_class"]["Angry"]["f1"] == 0.0


# --- models --------------------------------------------------------------------------


def test_compact_model_shape_and_size():
    model = models.compact(width=1.0)
    assert model.input_shape == (None, 48, 48, 1) and model.output_shape == (None, 7)
    assert 500_000 <= model.count_params() <= 1_500_000
    registry.check_model(model, InputSpec(48, 1, "unit"), "compact")


@pytest.mark.slow
def test_mobilenetv2_from_scratch_and_offline_imagenet_message(monkeypatch, tmp_path, capsys):
    spec = models.input_spec("mobilenetv2", 32)
    assert spec == InputSpec(32, 3, "symmetric")
    registry.check_model(models.build("mobilenetv2", spec), spec, "mobilenetv2")

    import keras.src.applications.mobilenet_v2 as mnv2

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(mnv2.file_utils, "get_file", offline)
    code = main(
        [
            "train",
            "--data",
            str(fer_csv(tmp_path / "fer.csv")),
            "--arch",
            "mobilenetv2",
            "--input-size",
            "32",
            "--weights",
            "imagenet",
            "--registry",
            str(tmp_path / "models"),
            "--out-dir",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "cannot download ImageNet weights" in err and "--weights none" in err
    assert "Traceback" not in err
    with pytest.raises(models.ModelError, match="weights file not found"):
        models.build("mobilenetv2", spec, weights=str(tmp_path / "missing.h5"))


# --- train -> evaluate -> registry, with an interrupted and resumed run --------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny 2-epoch run, interrupted after epoch 1 and resumed, then promoted."""
    tmp = tmp_path_factory.mktemp("train")
    csv_path = fer_csv(tmp / "fer.csv")
    root, run_dir = tmp / "models", tmp / "run"
    common = ["--registry", str(root), "--bench-seconds", "0.05"]
    first = main(
        [
            "train",
            "--data",
            str(csv_path),
            "--arch",
            "compact",
            "--width",
            "0.125",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--max-train",
            "48",
            "--version",
            "v1",
            "--out-dir",
            str(run_dir),
            "--epochs-this-run",
            "1",
            "--seed",
            "7",
            *common,
        ]
    )
    after_first = json.loads((run_dir / train.STATE_FILE).read_text())
    registered_early = (root / "v1").exists()
    second = main(["train", "--resume", "--out-dir", str(run_dir), "--promote", *common])
    return {
        "csv": csv_path,
        "root": root,
        "run": run_dir,
        "codes": (first, second),
        "after_first": after_first,
        "registered_early": registered_early,
    }


@pytest.mark.slow
def test_interrupted_run_resumes_at_epoch_2(trained):
    assert trained["codes"] == (0, 0)
    first = trained["after_first"]
    assert first["epoch"] == 1 and not trained["registered_early"]
    assert (trained["run"] / train.LAST).is_file() and (trained["run"] / train.BEST).is_file()
    state = json.loads((trained["run"] / train.STATE_FILE).read_text())
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    steps_per_epoch = first["optimizer_iterations"]
    assert steps_per_epoch == 3 and state["optimizer_iterations"] == 2 * steps_per_epoch


@pytest.mark.slow
def test_registered_version_metadata_and_promotion(trained):
    root = trained["root"]
    assert registry.current_version(root) == "v1"
    assert sorted(p.name for p in root.iterdir()) == ["current", "history.json", "v1"]
    folder = root / "v1"
    for name in ("model.keras", "metadata.json", "eval-PublicTest.json", "confusion-PublicTest.png"):
        assert (folder / name).is_file(), name
    # readable by a classifier running as another user (e.g. in a container)
    assert folder.stat().st_mode & 0o755 == 0o755
    for path in (folder / "metadata.json", folder / "eval-PublicTest.json", root / "current"):
        assert path.stat().st_mode & 0o644 == 0o644, path
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["version"] == "v1" and meta["architecture"] == "compact"
    assert meta["input"] == {"size": 48, "channels": 1, "scaling": "unit"}
    assert meta["classes"] == list(EMOTIONS)
    assert meta["dataset"]["splits"] == {"Training": 70, "PublicTest": 14, "PrivateTest": 14}
    assert meta["dataset"]["train_used"] == 48 and meta["dataset"]["path"] == str(trained["csv"])
    assert 0 <= meta["metrics"]["accuracy"] <= 1 and meta["metrics"]["n"] == 14
    assert meta["training"]["epochs"] == 2 and meta["training"]["width"] == 0.125
    assert meta["created"].endswith("+00:00") and meta["training_seconds"] > 0
    assert meta["params"] > 0 and meta["epochs_run"] == 2 and "git_commit" in meta
    entry = registry.resolve(root)
    model = registry.load_model(entry)
    registry.check_model(model, entry.spec, "v1")
    assert model.count_params() == meta["params"]


@pytest.mark.slow
def test_evaluate_command_writes_report(trained, tmp_path, capsys):
    out_json, out_png = tmp_path / "eval.json", tmp_path / "cm.png"
    code = main(
        [
            "evaluate",
            "--model",
            "v1",
            "--registry",
            str(trained["root"]),
            "--data",
            str(trained["csv"]),
            "--split",
            "PrivateTest",
            "--tta",
            "flip",
            "--json",
            str(out_json),
            "--png",
            str(out_png),
            "--bench-seconds",
            "0.05",
        ]
    )
    assert code == 0
    report = json.loads(out_json.read_text())
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "n"):
        assert key in report
    assert report["n"] == 14 and report["split"] == "PrivateTest" and report["tta"] == "flip"
    assert np.asarray(report["confusion_matrix"]).sum() == 14
    assert set(report["per_class"]) == set(EMOTIONS)
    assert set(report["speed_faces_per_s"]) == {"batch_1", "batch_64"}
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert "macro-F1" in capsys.readouterr().out
    # a run's checkpoint evaluates too: the run dir has the metadata with the input spec
    assert (
        main(
            [
                "evaluate",
                "--model",
                "current",
                "--registry",
                str(trained["root"]),
                "--data",
                str(trained["csv"]),
                "--bench-seconds",
                "0",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(trained["run"] / train.BEST),
                "--data",
                str(trained["csv"]),
                "--bench-seconds",
                "0",
            ]
        )
        == 0
    )


@pytest.mark.slow
def test_init_from_starts_a_run_at_a_registered_models_weights(trained, tmp_path, capsys):
    """Warm start: epoch 0 of the new run is the old model, so its first loss is far from
    a random init's; a different width is refused before any training."""
    root = trained["root"]
    common = [
        "train",
        "--data",
        str(trained["csv"]),
        "--registry",
        str(root),
        "--arch",
        "compact",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-train",
        "16",
        "--bench-seconds",
        "0",
        "--seed",
        "8",
    ]  # v1's seed was 7: another init
    assert (
        main(
            [
                *common,
                "--width",
                "0.125",
                "--init-from",
                "v1",
                "--version",
                "v1-tuned",
                "--out-dir",
                str(tmp_path / "tuned"),
            ]
        )
        == 0
    )
    assert "initialised" in capsys.readouterr().out
    old = registry.load_model(registry.resolve(root, "v1"))
    new = registry.load_model(registry.resolve(root, "v1-tuned"))
    # one epoch of 1 step at a tiny warm-up LR moves the weights only slightly
    kernel = {w.path: w.numpy() for w in old.weights}["stem1_conv/kernel"]
    moved = {w.path: w.numpy() for w in new.weights}["stem1_conv/kernel"]
    assert np.abs(moved - kernel).max() < 0.1 * np.abs(kernel).max()
    assert (
        main(
            [
                *common,
                "--width",
                "0.25",
                "--init-from",
                "v1",
                "--version",
                "v1-wide",
                "--out-dir",
                str(tmp_path / "wide"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "not the same network" in err and "stem1_conv/kernel" in err
    assert not (root / "v1-wide").exists()


@pytest.mark.slow
def test_derive_serves_the_same_weights_another_way(trained, capsys):
    """derive copies the weights, records the new TTA and its source, and scores PublicTest
    exactly as evaluate does for that TTA; names are never reused."""
    root = trained["root"]
    common = ["--registry", str(root), "--bench-seconds", "0"]
    assert main(["derive", "v1", "v1-flip", "--tta", "flip", *common]) == 0  # --data from v1
    source, derived = registry.resolve(root, "v1"), registry.resolve(root, "v1-flip")
    assert derived.tta == "flip" and derived.metadata["derived_from"] == "v1"
    assert derived.metadata["training"] == source.metadata["training"]
    for a, b in zip(registry.load_model(source).weights, registry.load_model(derived).weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    report = json.loads((derived.path / "eval-PublicTest.json").read_text())
    assert report["tta"] == "flip" and report["n"] == 14
    assert derived.metadata["metrics"]["accuracy"] == report["accuracy"]
    assert (derived.path / "confusion-PublicTest.png").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--model", "v1-flip", "--data", str(trained["csv"]), *common]) == 0
    assert f"accuracy {report['accuracy']:.4f}" in capsys.readouterr().out
    assert main(["derive", "v1", "v1-flip", "--tta", "none", *common]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["derive", "v1", "bad/name", "--tta", "none", *common]) == 2
    assert "invalid version name" in capsys.readouterr().err


@pytest.mark.slow
def test_derive_to_bfloat16_is_scored_in_bfloat16_or_refused_with_the_reason(trained, capsys, monkeypatch):
    from services.model import runtime

    root = trained["root"]
    common = ["--registry", str(root), "--bench-seconds", "0"]
    assert main(["derive", "v1", "v1-same", "--tta", "none", "--precision", "float32", *common]) == 2
    assert "already served with tta none and precision float32" in capsys.readouterr().err
    if runtime.native_bfloat16():
        assert main(["derive", "v1", "v1-bf16", "--precision", "bfloat16", *common]) == 0
        derived = registry.resolve(root, "v1-bf16")
        assert derived.precision == "bfloat16" and derived.tta == "none"
        report = json.loads((derived.path / "eval-PublicTest.json").read_text())
        assert report["precision"] == "bfloat16" and "precision_fallback" not in report
        assert "precision bfloat16" in capsys.readouterr().out
    monkeypatch.setattr(runtime, "native_bfloat16", lambda cpuinfo="": False)
    assert main(["derive", "v1", "v1-bf16-here", "--precision", "bfloat16", *common]) == 2
    assert "no native bfloat16" in capsys.readouterr().err
    assert not (root / "v1-bf16-here").exists()
    # evaluate says which precision it really used
    assert (
        main(["evaluate", "--model", "v1", "--data", str(trained["csv"]), "--precision", "bfloat16", *common])
        == 0
    )
    out = capsys.readouterr().out
    assert "precision float32" in out and "bfloat16 was asked for, float32 used" in out


@pytest.mark.slow
def test_derive_to_int8_is_scored_on_tflite_with_int8_weights(trained, capsys):
    root = trained["root"]
    common = ["--registry", str(root), "--bench-seconds", "0"]
    assert main(["derive", "v1", "v1-int8", "--precision", "int8", *common]) == 0
    derived = registry.resolve(root, "v1-int8")
    assert derived.precision == "int8" and derived.metadata["derived_from"] == "v1"
    report = json.loads((derived.path / "eval-PublicTest.json").read_text())
    assert (report["runtime"], report["precision"]) == ("auto", "int8")
    assert "precision_fallback" not in report
    source = json.loads((registry.resolve(root, "v1").path / "eval-PublicTest.json").read_text())
    assert abs(report["accuracy"] - source["accuracy"]) < 0.1
    out = capsys.readouterr().out
    assert "precision int8" in out
    # asked on the tf-function runtime, evaluate says it used float32, and why
    csv = str(trained["csv"])
    assert main(["evaluate", "--model", "v1-int8", "--data", csv, "--runtime", "tf-function", *common]) == 0
    assert "int8 was asked for, float32 used: int8 weights run on TFLite only" in capsys.readouterr().out


@pytest.mark.slow
def test_teacher_targets_mix_flip_averaged_teacher_probabilities_with_labels(trained, tmp_path, capsys):
    root = trained["root"]
    split = data.load_dataset(trained["csv"]).split(data.TRAIN)
    teacher = registry.resolve(root, "v1")
    runner = InferenceRunner(registry.load_model(teacher), teacher.spec, tta="flip")
    flipped = evaluate.predict(runner, split)
    pure = train.teacher_targets(["v1"], split, root, weight=1.0, temperature=1.0)
    np.testing.assert_allclose(pure, flipped, atol=1e-5)
    labels_only = train.teacher_targets(["v1", "v1"], split, root, weight=0.0, temperature=2.0)
    np.testing.assert_array_equal(labels_only, np.eye(7)[split.labels])
    mixed = train.teacher_targets(["v1"], split, root, weight=0.5, temperature=4.0)
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, atol=1e-5)
    assert (mixed[np.arange(len(split)), split.labels] >= 0.5).all()
    assert np.ptp(mixed - 0.5 * np.eye(7)[split.labels], axis=1).max() < np.ptp(flipped, axis=1).max() / 2

    common = [
        "train",
        "--data",
        str(trained["csv"]),
        "--registry",
        str(root),
        "--arch",
        "compact",
        "--width",
        "0.125",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--max-train",
        "16",
        "--bench-seconds",
        "0",
        "--teacher",
        "v1",
    ]
    assert (
        main(
            [
                *common,
                "--tta",
                "flip",
                "--version",
                "v1-student",
                "--out-dir",
                str(tmp_path / "s"),
                "--epochs-this-run",
                "1",
            ]
        )
        == 0
    )
    assert "teacher v1: 16 training faces" in capsys.readouterr().out
    saved = np.load(tmp_path / "s" / train.TEACHER_TARGETS, allow_pickle=False)
    np.testing.assert_allclose(saved.sum(axis=1), 1.0, atol=1e-5)
    # the teachers run once per run: --resume reads their targets back
    assert main(["train", "--resume", "--out-dir", str(tmp_path / "s"), "--registry", str(root)]) == 0
    out = capsys.readouterr().out
    assert "teacher targets from" in out and "teacher v1:" not in out
    # a run stopped before its first epoch ended starts again in its directory without
    # running the teachers again, unless what the targets are made from changed
    for name in (train.TEACHER_TARGETS, "teacher-targets.json"):
        (tmp_path / "again" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "again" / name).write_bytes((tmp_path / "s" / name).read_bytes())
    assert (
        main(
            [
                *common,
                "--tta",
                "flip",
                "--version",
                "v1-again",
                "--epochs-this-run",
                "1",
                "--out-dir",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "teacher targets from" in out and "teacher v1:" not in out
    (tmp_path / "again" / train.STATE_FILE).unlink()
    assert (
        main(
            [
                *common,
                "--teacher-weight",
                "0.5",
                "--version",
                "v1-again",
                "--epochs-this-run",
                "1",
                "--out-dir",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    assert "teacher v1: 16 training faces" in capsys.readouterr().out
    meta = json.loads((root / "v1-student" / registry.METADATA_FILE).read_text())
    assert meta["training"]["teacher"] == ["v1"] and meta["training"]["teacher_weight"] == 0.7
    # the student is served and scored with flip TTA, as its registration asked
    assert meta["tta"] == "flip" and registry.resolve(root, "v1-student").tta == "flip"
    assert json.loads((root / "v1-student" / "eval-PublicTest.json").read_text())["tta"] == "flip"
    out_json = tmp_path / "student.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                "v1-student",
                "--registry",
                str(root),
                "--data",
                str(trained["csv"]),
                "--bench-seconds",
                "0",
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    assert json.loads(out_json.read_text())["tta"] == "flip"
    assert (
        main([*common, "--teacher-weight", "1.5", "--version", "bad", "--out-dir", str(tmp_path / "bad")])
        == 2
    )
    assert "--teacher-weight 1.5: must be between 0 and 1" in capsys.readouterr().err
    assert not (root / "bad").exists()


def test_evaluate_keras_file_without_metadata_fails_clearly(tmp_path, capsys):
    tiny_model().save(tmp_path / "lonely.keras")
    csv_path = fer_csv(tmp_path / "fer.csv", (7, 7, 0))
    assert main(["evaluate", "--model", str(tmp_path / "lonely.keras"), "--data", str(csv_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no metadata.json beside the model" in err


@pytest.mark.slow
def test_train_refuses_existing_version_and_existing_run(trained, capsys):
    args = ["train", "--data", str(trained["csv"]), "--registry", str(trained["root"])]
    assert main([*args, "--version", "v1", "--out-dir", str(trained["run"].parent / "other")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--version", "v9", "--out-dir", str(trained["run"])]) == 2
    assert "--resume" in capsys.readouterr().err


def test_bad_data_through_the_cli_is_one_line(tmp_path, capsys):
    path = write_csv(tmp_path / "bad.csv", [(9, pixels(0), "Training")])
    assert (
        main(
            [
                "train",
                "--data",
                str(path),
                "--registry",
                str(tmp_path / "m"),
                "--out-dir",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.strip() == f"error: {path}:2: emotion 9 outside 0..6"


# --- registry commands ---------------------------------------------------------------


def test_promote_rollback_and_list(tmp_path, capsys):
    root = tmp_path / "models"
    make_version(root, "v1")
    make_version(root, "v2")
    reg = ["--registry", str(root)]
    assert main(["promote", "v1", *reg]) == 0
    assert main(["promote", "v2", *reg]) == 0
    assert registry.current_version(root) == "v2"
    assert main(["rollback", *reg]) == 0
    assert registry.current_version(root) == "v1"
    assert main(["list", *reg]) == 0
    out = capsys.readouterr().out
    assert "* v1" in out and "  v2" in out
    assert main(["rollback", *reg]) == 2
    assert "nothing to roll back" in capsys.readouterr().err


def test_import_copies_missing_versions_and_never_replaces(tmp_path, capsys):
    shipped, root = tmp_path / "shipped", tmp_path / "models"
    make_version(shipped, "v1")
    make_version(shipped, "v2")
    registry.promote(shipped, "v2")
    mine = make_version(root, "v1", outputs=5)  # a same-named version of the user's own
    before = (mine / registry.MODEL_FILE).read_bytes()
    assert main(["import", str(shipped), "--promote", "--registry", str(root)]) == 0
    out = capsys.readouterr().out
    assert "v2" in out and "already there: v1" in out and "promoted v2" in out
    assert (mine / registry.MODEL_FILE).read_bytes() == before
    assert (root / "v2" / registry.MODEL_FILE).read_bytes() == (
        shipped / "v2" / registry.MODEL_FILE
    ).read_bytes()
    assert registry.current_version(root) == "v2"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert main(["import", str(tmp_path / "nowhere"), "--registry", str(root)]) == 2
    assert "no such registry directory" in capsys.readouterr().err


def test_registry_env_var(tmp_path, monkeypatch, capsys):
    import importlib

    import training.cli as cli_main

    make_version(tmp_path / "envreg", "only")
    monkeypatch.setenv("EMOTION_REGISTRY", str(tmp_path / "envreg"))
    importlib.reload(cli_main)
    assert cli_main.main(["list"]) == 0
    assert "only" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["garbage", "five_outputs"])
def test_promoting_a_broken_model_fails_and_keeps_current(tmp_path, damage, capsys):
    root = tmp_path / "models"
    make_version(root, "good")
    bad = make_version(root, "bad", outputs=5 if damage == "five_outputs" else 7)
    if damage == "garbage":
        (bad / registry.MODEL_FILE).write_bytes(b"\x00garbage" * 100)
    registry.promote(root, "good")
    with pytest.raises(
        registry.RegistryError, match="not a Keras model file" if damage == "garbage" else "output shape"
    ):
        registry.promote(root, "bad")
    assert registry.current_version(root) == "good"
    assert main(["promote", "bad", "--registry", str(root)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert registry.current_version(root) == "good" and registry.history(root) == ["good"]


def test_promote_and_rollback_check_an_int8_version_on_its_kept_tflite_without_tensorflow(tmp_path):
    """As the classifier serves it: a promote takes a fraction of a second, not an import."""
    import subprocess
    import sys

    from tests.support import ROOT, write_tiny_model

    root = tmp_path / "models"
    for seed, version in enumerate(("a", "b")):
        write_tiny_model(root, version, seed=seed, precision="int8", keep_tflite=True)
    probe = (
        "import sys; from services.model import registry\n"
        f"root = {str(root)!r}\n"
        "registry.promote(root, 'a'); registry.promote(root, 'b')\n"
        "print(registry.rollback(root), 'tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["a", "False", "False"]
    # a kept file that does not answer is no proof: the Keras model is loaded and checked
    # (test_promoting_a_broken_model_fails_and_keeps_current: one that loads)
    (root / "a" / "model.keras").write_bytes(b"garbage")
    registry.keep_tflite(registry.tflite_file(registry.read_entry(root / "a"), "int8"), b"TFL3 junk")
    with pytest.raises(registry.RegistryError, match="a/model.keras: not a Keras model file"):
        registry.promote(root, "a")
    assert registry.current_version(root) == "a"


def test_interrupted_registration_leaves_no_partial_version(tmp_path, monkeypatch):
    root = tmp_path / "models"
    report = evaluate.metrics_from_confusion(evaluate.confusion_matrix([0, 1], [0, 1]))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(evaluate, "write_artefacts", fail)
    with pytest.raises(OSError, match="disk full"):
        train.register(root, "v1", tiny_model(), {"version": "v1"}, report)
    assert list(root.iterdir()) == []
    assert registry.list_versions(root) == []
    monkeypatch.undo()
    train.register(
        root, "v1", tiny_model(), {"version": "v1", "input": InputSpec(8, 1, "unit").to_dict()}, report
    )
    assert [e.version for e in registry.list_versions(root)] == ["v1"]
    with pytest.raises(registry.RegistryError, match="already exists"):
        train.register(root, "v1", tiny_model(), {"version": "v1"}, report)


def test_half_written_hidden_version_is_not_listed(tmp_path):
    root = tmp_path / "models"
    make_version(root, "v1")
    make_version(root, ".v2.tmp-abc")
    assert [e.path.name for e in registry.list_versions(root)] == ["v1"]


# --- evaluate on a whole folder, FER+ votes --------------------------------------------------


@pytest.mark.slow
def test_evaluate_scores_every_image_of_a_plain_class_folder(trained, tmp_path, capsys):
    rng = np.random.default_rng(3)
    counts = [5, 2, 4, 6, 3, 4, 7]
    for label, n in enumerate(counts):
        for i in range(n):
            write_image(
                tmp_path / "faces" / EMOTIONS[label].lower() / f"{i}.png",
                rng.integers(0, 256, (48, 48), np.uint8),
            )
    out_json = tmp_path / "eval.json"
    common = [
        "evaluate",
        "--model",
        "v1",
        "--registry",
        str(trained["root"]),
        "--data",
        str(tmp_path / "faces"),
        "--bench-seconds",
        "0",
    ]
    assert main([*common, "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    assert report["split"] == "all" and report["n"] == sum(counts) == 31
    assert np.asarray(report["confusion_matrix"]).sum(axis=1).tolist() == counts
    assert "[all]: n = 31 faces" in capsys.readouterr().out
    # the hold-out is still there on request, and a CSV keeps PublicTest as its default
    assert main([*common, "--split", "PublicTest", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["n"] == 2  # 10 % per class, rounded
    assert (
        main(
            [
                "evaluate",
                "--model",
                "v1",
                "--registry",
                str(trained["root"]),
                "--data",
                str(trained["csv"]),
                "--bench-seconds",
                "0",
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    assert json.loads(out_json.read_text())["split"] == "PublicTest"
    assert (
        main(
            [
                "evaluate",
                "--model",
                "v1",
                "--registry",
                str(trained["root"]),
                "--data",
                str(trained["csv"]),
                "--bench-seconds",
                "0",
                "--split",
                "all",
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    assert json.loads(out_json.read_text())["n"] == 98


def test_evaluate_scores_the_mean_probabilities_of_several_models(tmp_path, capsys):
    """Repeated --model: an ensemble, scored on its members' mean probabilities (each with
    its own TTA), the same answers as averaging the runners by hand."""
    root, csv_path = tmp_path / "models", fer_csv(tmp_path / "fer.csv")
    keras.utils.set_random_seed(11)
    make_version(root, "a")
    make_version(root, "b")
    meta = json.loads((root / "b" / registry.METADATA_FILE).read_text())
    (root / "b" / registry.METADATA_FILE).write_text(json.dumps({**meta, "tta": "flip"}))
    out_json = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                "a",
                "--model",
                "b",
                "--registry",
                str(root),
                "--data",
                str(csv_path),
                "--bench-seconds",
                "0.05",
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    report = json.loads(out_json.read_text())
    assert report["version"] == "a + b" and report["n"] == 14
    assert [(m["version"], m["tta"]) for m in report["members"]] == [("a", "none"), ("b", "flip")]
    split = data.load_dataset(csv_path).split("PublicTest")
    probs = [
        evaluate.predict(InferenceRunner(registry.load_model(entry), entry.spec, tta=entry.tta), split)
        for entry in (registry.resolve(root, v) for v in ("a", "b"))
    ]
    expected = evaluate.confusion_matrix(split.labels, np.mean(probs, axis=0).argmax(axis=1))
    assert report["confusion_matrix"] == expected.tolist()
    assert set(report["speed_faces_per_s"]) == {"batch_1", "batch_64"}
    assert "mean probabilities of a (tta none, float32), b (tta flip, float32)" in capsys.readouterr().out


def test_folds_are_fixed_and_stratified():
    labels = np.repeat(np.arange(7), [40, 5, 12, 70, 33, 21, 9])
    folds = data.fold_ids(labels, 5)
    np.testing.assert_array_equal(folds, data.fold_ids(labels, 5))  # the same every run
    for label in range(7):
        per_fold = np.bincount(folds[labels == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    with pytest.raises(DataError, match="--folds 1"):
        data.fold_ids(labels, 1)


@pytest.mark.slow
def test_cross_fitted_teachers_answer_only_for_the_fold_they_never_saw(tmp_path, capsys):
    csv_path, root = fer_csv(tmp_path / "fer.csv"), tmp_path / "models"
    common = [
        "train",
        "--data",
        str(csv_path),
        "--registry",
        str(root),
        "--arch",
        "compact",
        "--width",
        "0.125",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--bench-seconds",
        "0",
        "--folds",
        "2",
    ]
    for k in (0, 1):
        assert (
            main(
                [
                    *common,
                    "--holdout-fold",
                    str(k),
                    "--version",
                    f"f{k}",
                    "--out-dir",
                    str(tmp_path / f"f{k}"),
                ]
            )
            == 0
        )
    whole = data.load_dataset(csv_path).split(data.TRAIN)
    folds = data.fold_ids(whole.labels, 2)
    for k in (0, 1):
        meta = json.loads((root / f"f{k}" / registry.METADATA_FILE).read_text())
        assert meta["dataset"]["train_used"] == int((folds != k).sum())
        assert (meta["training"]["folds"], meta["training"]["holdout_fold"]) == (2, k)
    assert "fold 1 of 2 held out: training on the other" in capsys.readouterr().out

    # each face's target is the answer of the teacher that held its fold out
    targets = train.teacher_targets(["f0", "f1"], whole, root, weight=1.0, temperature=1.0)
    for k in (0, 1):
        entry = registry.resolve(root, f"f{k}")
        runner = InferenceRunner(registry.load_model(entry), entry.spec, tta="flip")
        mine = np.flatnonzero(folds == k)
        np.testing.assert_allclose(targets[mine], evaluate.predict(runner, whole.subset(mine)), atol=1e-5)
    # a subset (e.g. --max-train) keeps each face's fold
    part = whole.subset(np.arange(0, 70, 3))
    np.testing.assert_allclose(
        train.teacher_targets(
            ["f0", "f1"], part, root, weight=1.0, temperature=1.0, whole_labels=whole.labels
        ),
        targets[::3],
        atol=1e-5,
    )
    with pytest.raises(train.RunError, match="35 training faces are in no fold a teacher held out"):
        train.teacher_targets(["f0"], whole, root, weight=1.0, temperature=1.0)

    assert main([*common[:-2], "--holdout-fold", "1", "--version", "bad"]) == 2
    assert "--holdout-fold needs --folds" in capsys.readouterr().err
    assert main([*common, "--holdout-fold", "2", "--version", "bad"]) == 2
    assert "give --holdout-fold, 0 to 1" in capsys.readouterr().err


FERPLUS_HEADER = (
    "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\n"
)


def test_ferplus_votes_become_soft_targets_and_not_faces_are_left_out(tmp_path):
    votes = tmp_path / "ferplus.csv"
    votes.write_text(
        FERPLUS_HEADER
        + "Training,a.png,0,10,0,0,0,0,0,0,0,0\n"  # all Happy
        + "Training,b.png,5,0,0,0,5,0,0,0,0,0\n"  # half Neutral, half Angry
        + "Training,c.png,0,0,0,0,0,0,0,0,2,8\n"  # not a face
        + "Training,,0,0,0,0,0,0,0,2,8,0\n"  # no votes for our classes
        + "PublicTest,e.png,10,0,0,0,0,0,0,0,0,0\n"
    )
    split = data.Split(np.zeros((4, 48, 48), np.uint8), np.array([3, 6, 0, 2]))
    ferplus = data.load_ferplus(votes)
    assert ferplus.votes.shape == (4, 7) and ferplus.not_face.tolist() == [0, 0, 8, 0]
    mixed = data.with_ferplus(split, ferplus, weight=0.5, drop_not_faces=True)
    assert len(mixed) == 3 and mixed.labels.tolist() == [3, 6, 2]
    expected_b = np.zeros(7)
    expected_b[[0, 6]] = 0.25
    expected_b[6] += 0.5
    assert np.allclose(mixed.targets[0], np.eye(7)[3])
    assert np.allclose(mixed.targets[1], expected_b)
    assert np.allclose(mixed.targets[2], np.eye(7)[2])  # label kept where no votes count
    assert np.allclose(mixed.training_targets().sum(axis=1), 1)
    assert np.allclose(mixed.subset(np.array([1])).targets[0], expected_b)
    kept = data.with_ferplus(split, ferplus, weight=1.0, drop_not_faces=False)
    assert len(kept) == 4


def test_ferplus_problems_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(FERPLUS_HEADER + "Training,a.png,0,x,0,0,0,0,0,0,0,0\n")
    with pytest.raises(DataError, match=r"bad.csv:2: vote counts must be integers"):
        data.load_ferplus(bad)
    bad.write_text("Usage,neutral\nTraining,1\n")
    with pytest.raises(DataError, match=r"bad.csv:1: missing column\(s\) happiness"):
        data.load_ferplus(bad)
    with pytest.raises(DataError, match="cannot read FER\\+ votes"):
        data.load_ferplus(tmp_path / "missing.csv")
    ok = tmp_path / "ok.csv"
    ok.write_text(FERPLUS_HEADER + "Training,a.png,0,10,0,0,0,0,0,0,0,0\n")
    split = data.Split(np.zeros((2, 48, 48), np.uint8), np.array([3, 6]))
    with pytest.raises(DataError, match="FER\\+ votes for 1 rows, the split has 2"):
        data.with_ferplus(split, data.load_ferplus(ok), 0.5, True)


def votes_row(usage: str, name: str, counts: dict) -> str:
    return f"{usage},{name}," + ",".join(str(counts.get(c, 0)) for c in data.FERPLUS_COLUMNS) + "\n"


def test_ferplus_majority_leaves_out_other_ties_and_no_votes(tmp_path):
    votes = tmp_path / "votes.csv"
    votes.write_text(
        FERPLUS_HEADER
        + votes_row("Training", "a.png", {"happiness": 6, "neutral": 4})  # Happy
        + votes_row("Training", "b.png", {"contempt": 5, "anger": 4})  # contempt
        + votes_row("Training", "c.png", {"sadness": 4, "fear": 4, "neutral": 2})  # tied
        + votes_row("Training", "d.png", {"NF": 9, "anger": 1})  # not a face
        + votes_row("Training", "", {})  # no votes
        + votes_row("Training", "f.png", {"unknown": 5, "fear": 3})  # unknown
        + votes_row("Training", "g.png", {"fear": 7, "surprise": 3})  # Fear
    )
    ferplus = data.load_ferplus(votes)
    assert ferplus.majority().tolist() == [3, -1, -1, -1, -1, -1, 2]
    split = data.Split(
        np.arange(7)[:, None, None].repeat(48, 1).repeat(48, 2).astype(np.uint8), np.full(7, 6)
    )
    alone = data.with_ferplus(split, ferplus, 0.5, True, majority=True)
    assert alone.labels.tolist() == [3, 2] and alone.faces[:, 0, 0].tolist() == [0, 6]
    assert np.array_equal(alone.training_targets(), np.eye(7)[[3, 2]])
    scored = data.with_majority(split, ferplus)
    report = evaluate._report(scored, np.eye(7)[[3, 0, 0, 0, 0, 0, 6]])
    assert report["accuracy"] == pytest.approx(1 / 7)  # against the labels (all Neutral)
    fp = report[evaluate.FERPLUS]
    assert fp["n"] == 2 and fp["left_out"] == 5 and fp["accuracy"] == 0.5
    assert evaluate.summary(report, "PublicTest")[evaluate.FERPLUS]["left_out"] == 5
    assert "FER+ majority: accuracy 0.5000" in evaluate.format_report(report)


def test_votes_file_whose_rows_do_not_match_the_csv_is_refused(tmp_path, capsys):
    csv_path = fer_csv(tmp_path / "fer.csv", per_split=(3, 2, 2))
    votes = tmp_path / "votes.csv"
    votes.write_text(FERPLUS_HEADER + votes_row("PublicTest", "a.png", {"neutral": 10}))
    split = data.load_dataset(csv_path).split("PublicTest")
    with pytest.raises(DataError) as err:
        data.with_majority(split, data.load_ferplus(votes, "PublicTest"))
    assert f"{votes}: FER+ votes for 1 rows, the split has 2 (PublicTest)" in str(err.value)
    model_dir = make_version(tmp_path / "models", "v")
    code = main(["evaluate", "--model", str(model_dir), "--data", str(csv_path), "--ferplus", str(votes)])
    assert code == 2 and "FER+ votes for 1 rows, the split has 2" in capsys.readouterr().err


def test_training_evaluation_and_serving_turn_crops_into_the_same_arrays():
    """The one preprocess_faces, with the version's normalisation, on every path."""
    crops = np.random.default_rng(3).integers(90, 150, (5, 48, 48), np.uint8)
    spec = InputSpec(48, 1, "unit", "equalize")
    seen = []
    runner = object.__new__(InferenceRunner)  # the serving runner, its model swapped for a probe
    runner.spec = spec
    runner.predict_inputs = lambda x, tta=None: seen.append(x) or np.zeros((len(x), 7), np.float32)
    runner.predict_faces(crops)  # the classifier service's call
    evaluate.predict(runner, data.Split(crops, np.zeros(5, np.int64)))
    trained_on = train.Batches(data.Split(crops, np.zeros(5, np.int64)), spec, 8)[0][0]
    for served in seen:
        np.testing.assert_array_equal(served, trained_on)
    np.testing.assert_array_equal(trained_on, preprocess_faces(crops, spec))
    assert not np.array_equal(trained_on, preprocess_faces(crops, spec.network()))


def test_ferplus_votes_command_matches_rows_to_images_by_their_pixels(tmp_path, capsys):
    faces = [np.random.default_rng(i).integers(0, 256, (48, 48), np.uint8) for i in range(4)]
    # the fourth face has no image
    rows = [(0, " ".join(map(str, f.ravel())), u) for f, u in zip(faces, data.SPLITS + ("Training",))]
    csv_path = write_csv(tmp_path / "fer.csv", [rows[3], rows[0], rows[1], rows[2]])
    new = tmp_path / "fer2013new.csv"
    new.write_text(
        FERPLUS_HEADER
        + votes_row("Training", "fer0000000.png", {"anger": 10})
        + votes_row("PublicTest", "fer0000001.png", {"happiness": 10})
        + votes_row("PrivateTest", "fer0000002.png", {"fear": 9, "NF": 1})
    )
    for i, folder in enumerate(("FER2013Train", "FER2013Valid", "FER2013Test")):
        write_image(tmp_path / "images" / folder / f"fer{i:07d}.png", faces[i])
    out = tmp_path / "votes.csv"
    args = ["--data", str(csv_path), "--fer2013new", str(new), "--images", str(tmp_path / "images")]
    assert main(["ferplus-votes", *args, "--out", str(out)]) == 0
    assert "Training: 1 of 2 faces matched" in capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert lines[1] == "Training,,0,0,0,0,0,0,0,0,0,0"
    assert lines[2].startswith("Training,fer0000000.png,0,0,0,0,10")
    assert data.load_ferplus(out, "PrivateTest").majority().tolist() == [2]


@pytest.mark.slow
def test_train_with_ferplus_learns_from_the_vote_shares(trained, tmp_path, capsys):
    votes = tmp_path / "votes.csv"
    votes.write_text(
        FERPLUS_HEADER
        + "".join(
            f"Training,{i}.png,{i % 3},{10 - i % 3},0,0,0,0,0,0,0,{15 if i == 5 else 0}\n" for i in range(70)
        )
        + "".join(
            votes_row("PublicTest", f"p{i}.png", {"happiness": 6 + i % 3, "sadness": 4}) for i in range(14)
        )
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(trained["csv"]),
                "--ferplus",
                str(votes),
                "--arch",
                "compact",
                "--width",
                "0.125",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--version",
                "fp",
                "--registry",
                str(tmp_path / "models"),
                "--out-dir",
                str(tmp_path / "run"),
                "--bench-seconds",
                "0",
                "--normalisation",
                "equalize",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "1 training faces left out as not faces" in out and "training on 69" in out
    meta = json.loads((tmp_path / "models" / "fp" / "metadata.json").read_text())
    assert meta["training"]["ferplus"] == str(votes) and meta["training"]["ferplus_weight"] == 0.5
    assert "selecting epochs on the FER+ majority of 14 PublicTest faces" in out
    assert meta["input"]["normalisation"] == "equalize"
    assert meta["metrics"]["ferplus_majority"]["n"] == 14
    derive = ["derive", "fp", "fp-flip", "--tta", "flip", "--registry", str(tmp_path / "models")]
    assert main([*derive, "--bench-seconds", "0"]) == 0  # scored on the votes fp was trained with
    derived = json.loads((tmp_path / "models" / "fp-flip" / "metadata.json").read_text())
    assert derived["metrics"]["ferplus_majority"]["n"] == 14 and derived["input"] == meta["input"]
