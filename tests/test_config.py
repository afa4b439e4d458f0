"""Options: every flag has an environment variable, documented, and every service answers --help."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.common.config import ServiceParser, env_name
from services.common.configdoc import SERVICES, document
from tests.support import ROOT


def test_configuration_doc_is_current():
    assert (ROOT / "docs" / "configuration.md").read_text() == document(), (
        "regenerate: python -m services.common.configdoc > docs/configuration.md"
    )


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.slow
def test_every_service_answers_help(service):
    out = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "--metrics-port" in out.stdout and "EMOTION_METRICS_PORT" in out.stdout


def test_environment_sets_defaults_and_flags_win(monkeypatch):
    monkeypatch.setenv("EMOTION_MAX_AGE_MS", "250")
    monkeypatch.setenv("EMOTION_LOOP", "yes")
    parser = ServiceParser()
    parser.option("--max-age-ms", default=500.0, type=float)
    parser.option("--loop", default=False, type=bool)
    args = parser.parse_args([])
    assert (args.max_age_ms, args.loop) == (250.0, True)
    args = parser.parse_args(["--max-age-ms", "100", "--no-loop"])
    assert (args.max_age_ms, args.loop) == (100.0, False)


@pytest.mark.parametrize(
    "name,value,kind", [("EMOTION_FPS", "fast", float), ("EMOTION_LOOP", "perhaps", bool)]
)
def test_bad_environment_value_names_the_variable(monkeypatch, capsys, name, value, kind):
    monkeypatch.setenv(name, value)
    parser = ServiceParser()
    with pytest.raises(SystemExit):
        parser.option("--" + name[len("EMOTION_") :].lower(), default=kind(), type=kind)
    assert name in capsys.readouterr().err


def test_env_name():
    assert env_name("--max-age-ms") == "EMOTION_MAX_AGE_MS"


def test_the_configuration_doc_leaves_the_environment_as_it_was(monkeypatch):
    """document() ignores EMOTION_* variables, but must not remove them for later code (the
    test suite's processes inherit EMOTION_AUTH=off from it)."""
    monkeypatch.setenv("EMOTION_DELAY_MS", "250")
    before = dict(os.environ)
    assert "`250`" not in document().split("## viewer")[1].split("## ")[0]
    assert dict(os.environ) == before
