"""Hot reload: promote, roll back and break the registry under a running pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from services.model import registry
from tests.support import ROOT, metric_sum, wait_for, write_tiny_model
from tests.support.pipeline import Collector, Pipeline

pytestmark = pytest.mark.slow


def training_cli(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_promote_rollback_and_broken_models_under_load(tmp_path):
    root = tmp_path / "models"
    # int8 versions with their TFLite models kept, as shipped: the classifier, promote and
    # rollback never import TensorFlow (test_classifier_service reloads a version from Keras).
    write_tiny_model(root, "v1", seed=1, precision="int8", keep_tflite=True)
    write_tiny_model(root, "v2", seed=2, precision="int8", keep_tflite=True)
    registry.promote(root, "v1")
    pipeline = Pipeline(tmp_path, root, classifier_args=("--reload-poll-s", "0.5"))
    results = Collector(pipeline.addr, "results")
    results.start()
    time.sleep(0.5)
    try:
        pipeline.start("capture", "--source", "demo", "--fps", "15")
        wait_for(lambda: any(h.results for _, h in results.arrivals), 60, what="first results")

        def switched_to(version: str, since: float) -> float | None:
            for at, header in results.arrivals:
                if at >= since and header.model == version:
                    return at
            return None

        # Promote v2 with the training CLI: every result after the switch names v2.
        started = time.monotonic()
        training_cli("promote", "v2", "--registry", str(root))
        promoted = time.monotonic()
        first_v2 = wait_for(lambda: switched_to("v2", started), 20, what="results from v2")
        assert first_v2 - promoted < 5.0, f"switch took {first_v2 - promoted:.1f} s"
        time.sleep(1.0)
        after = [h.model for at, h in results.arrivals if at > first_v2]
        assert after and set(after) == {"v2"}, "no result may come from v1 after the swap"
        scrape = pipeline.scrape("classifier#0")
        assert metric_sum(scrape, "emotion_classifier_model_info", version="v2") == 1
        assert metric_sum(scrape, "emotion_classifier_model_info", version="v1") == 0
        assert metric_sum(scrape, "emotion_classifier_model_reloads_total", result="ok") == 1

        # Roll back: v1 answers again.
        started = time.monotonic()
        training_cli("rollback", "--registry", str(root))
        rolled = time.monotonic()
        first_v1 = wait_for(lambda: switched_to("v1", started), 20, what="results from v1 again")
        assert first_v1 - rolled < 5.0

        # A corrupt file and a wrong-shaped model, pointed at directly (as a careless copy
        # would): never served, counted as failed, v1 keeps answering.
        (root / "corrupt").mkdir()
        (root / "corrupt" / "model.keras").write_bytes(b"this is not a zip file")
        (root / "corrupt" / "metadata.json").write_text((root / "v1" / "metadata.json").read_text())
        write_tiny_model(root, "five-classes", outputs=5, precision="int8", keep_tflite=True)
        for failures, version in enumerate(("corrupt", "five-classes"), start=1):
            registry.atomic_write(root / registry.CURRENT, version + "\n")
            wait_for(
                lambda: (
                    metric_sum(
                        pipeline.scrape("classifier#0"),
                        "emotion_classifier_model_reloads_total",
                        result="failed",
                    )
                    == failures
                ),
                30,
                what=f"{version} rejected",
            )
        check_from = time.monotonic()
        time.sleep(1.5)
        recent = [h.model for at, h in results.arrivals if at > check_from]
        assert recent and set(recent) == {"v1"}
        assert pipeline.scrape("classifier#0")  # still alive

        # Operators can ask for a check at once.
        request = urllib.request.Request(
            f"http://127.0.0.1:{pipeline.ports['classifier#0']}/reload", method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.load(response) == {"serving": "v1", "current": "five-classes"}

        # No frame went missing because of the swaps: every gap is a counted drop.
        seqs = sorted({h.seq for _, h in results.arrivals})
        missing = set(range(seqs[0], seqs[-1] + 1)) - set(seqs)
        drops = sum(
            metric_sum(pipeline.scrape(name), "emotion_frames_dropped_total")
            for name in ("capture", "detector#0", "classifier#0")
        )
        assert len(missing) <= drops, (sorted(missing)[:20], drops)

        # The stream never stalled while a new model loaded beside the serving one.
        for since, until in ((promoted, first_v2 + 1.0), (rolled, first_v1 + 1.0)):
            times = [at for at, _ in results.arrivals if since <= at <= until]
            gaps = [b - a for a, b in zip([since, *times], [*times, until])]
            assert max(gaps) < 1.0, f"results stalled {max(gaps):.2f} s during a model swap"
    finally:
        results.close()
        pipeline.stop()
