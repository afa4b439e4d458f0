"""The notifier in process: rules, the queue, webhooks to a real HTTP receiver and MQTT to a
real mosquitto (skipped without it), driven through real inproc:// ZeroMQ sockets."""

from __future__ import annotations

import json
import logging
import re
import threading
from contextlib import contextmanager
from itertools import count

import pytest
import zmq

from services import launch
from services.notifier import options
from services.notifier.mqtt import WINDOW, MqttSettings, MqttSink, discovery
from services.notifier.outbox import Outbox
from services.notifier.rules import RuleError, RulesFile, load_rules
from services.notifier.secret import mask_url
from services.notifier.service import NotifierService
from services.notifier.webhook import WebhookSettings, WebhookSink, backoff
from tests.support import ROOT, wait_for
from tests.support import mosquitto as mosq
from tests.support.notifier import Publisher, event, event_stream, tracks
from tests.support.webhook import Receiver

SECRET = "s3cret"
needs_mosquitto = pytest.mark.skipif(not mosq.available(), reason="mosquitto is not installed")
endpoints = count()

RULES_TOML = """
[[rules]]
name = "sad-on-camera-2"
cameras = ["2"]
events = ["emotion_held"]
emotions = ["Sad"]
min_duration_s = 10
sinks = ["webhook"]

[[rules]]
name = "confident-changes"
events = ["emotion_changed"]
min_confidence = 0.6
cooldown_s = 30
"""

RULES_YAML = """
rules:
  - name: sad-on-camera-2
    cameras: ["2"]
    events: [emotion_held]
    emotions: [Sad]
    min_duration_s: 10
    sinks: [webhook]
  - name: confident-changes
    events: [emotion_changed]
    min_confidence: 0.6
    cooldown_s: 30
"""


def make_service(
    tmp_path, webhooks=(), mqtt_url="", rules="", retries=5, backoff_s=0.001, queue_size=10000, **mqtt
):
    outbox = Outbox(tmp_path / "queue.db", queue_size, dead_size=5)
    settings = WebhookSettings(tuple(webhooks), SECRET, retries, backoff_s, 0.01, 2.0)
    sinks = [MqttSink(MqttSettings(mqtt_url, **mqtt), outbox)] if mqtt_url else []
    sinks += [WebhookSink(f"webhook{i}", url, outbox, settings) for i, url in enumerate(webhooks)]
    return NotifierService(outbox, sinks, RulesFile(rules), rejects=lambda error: None)


@contextmanager
def running(service):
    """The service's loop in a thread, fed by the Publisher it yields."""
    endpoint = f"inproc://tracks-{next(endpoints)}"
    ctx = zmq.Context.instance()
    publisher = Publisher(endpoint, ctx)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(sub, stop), daemon=True)
    thread.start()
    publisher.wait_subscribed()
    try:
        yield publisher
    finally:
        stop.set()
        thread.join(10)
        sub.close()
        publisher.close()
        service.outbox.close()


def documented_verify():
    """The verification code of docs/notifier.md, run as it is written there."""
    text = (ROOT / "docs" / "notifier.md").read_text()
    code = re.search(r"```python\n(.*?def verify.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(code, scope)
    return scope["verify"]


def ids(bodies) -> list[str]:
    return [b["id"] for b in bodies]


# --- rules ---------------------------------------------------------------------------------


def test_rules_read_the_same_from_toml_and_yaml(tmp_path):
    (tmp_path / "r.toml").write_text(RULES_TOML)
    (tmp_path / "r.yaml").write_text(RULES_YAML)
    rules = load_rules(tmp_path / "r.toml")
    assert rules == load_rules(tmp_path / "r.yaml")
    assert [r.name for r in rules] == ["sad-on-camera-2", "confident-changes"]
    assert rules[0].sinks == ("webhook",) and rules[1].sinks == ("mqtt", "webhook")


@pytest.mark.parametrize(
    "rule, field",
    [
        ("min_confidence: high", "rules[0].min_confidence"),
        ("min_confidence: 1.5", "rules[0].min_confidence"),
        ("emotions: [Grumpy]", "rules[0].emotions"),
        ("events: [track_paused]", "rules[0].events"),
        ("sinks: [email]", "rules[0].sinks"),
        ("cooldown_s: -1", "rules[0].cooldown_s"),
        ("emotion: Sad", "rules[0].emotion"),
    ],
)
def test_a_bad_field_is_refused_by_its_name(tmp_path, rule, field):
    path = tmp_path / "rules.yaml"
    path.write_text(f"rules:\n  - name: x\n    {rule}\n")
    with pytest.raises(RuleError, match=re.escape(f"{path}: {field}:")):
        load_rules(path)


def test_a_changed_rule_file_is_reloaded_and_a_bad_one_keeps_the_rules_in_force(tmp_path, caplog):
    path = tmp_path / "rules.toml"
    path.write_text(RULES_TOML)
    outcomes = []
    rules = RulesFile(path, outcomes.append)
    assert not rules.check()
    path.write_text('[[rules]]\nname = "only"\nmin_confidence = "high"\n')
    with caplog.at_level(logging.ERROR, "notifier"):
        assert not rules.check()
    assert [r.name for r in rules.rules] == ["sad-on-camera-2", "confident-changes"]
    assert "rules[0].min_confidence" in caplog.text and "previous 2 stay in force" in caplog.text
    path.write_text('[[rules]]\nname = "only"\nemotions = ["Happy"]\n')
    assert rules.check()
    assert [r.name for r in rules.rules] == ["only"] and outcomes == ["refused", "ok"]


def test_rules_filter_by_camera_event_emotion_confidence_and_cooldown(tmp_path):
    (tmp_path / "rules.toml").write_text(RULES_TOML)
    service = make_service(tmp_path, ["http://127.0.0.1:9/"], rules=str(tmp_path / "rules.toml"))

    def change(seq: int, label: str, p: float, t: float) -> list:
        service.on_message(tracks("1", seq, [("a", label, p)], t=t))  # the frame, then its event
        return service.on_message(event("1", seq, "a", "emotion_changed", label, t=t))

    assert service.on_message(event("1", 1, "a", "track_started", "Neutral")) == []  # no rule wants it
    assert change(2, "Happy", 0.5, 100.0) == []  # below min_confidence
    (row,) = change(3, "Sad", 0.9, 101.0)
    body = json.loads(row[1])
    assert row[0] == "webhook0" and body["rules"] == ["confident-changes"]
    assert (body["event"], body["label"], body["previous"], body["confidence"]) == (
        "emotion_changed",
        "Sad",
        "Neutral",
        0.9,
    )
    assert change(4, "Happy", 0.9, 120.0) == []  # within the 30 s cooldown of this track
    assert len(change(5, "Angry", 0.8, 131.5)) == 1


def test_sad_for_10_s_on_camera_2_makes_one_emotion_held_event(tmp_path):
    (tmp_path / "rules.yaml").write_text(RULES_YAML)
    service = make_service(tmp_path, ["http://127.0.0.1:9/"], rules=str(tmp_path / "rules.yaml"))
    on = service.on_message
    for camera in ("1", "2"):
        on(event(camera, 0, "p", "track_started", "Sad", t=1000.0))
    held = []
    for i in range(1, 25):
        for camera in ("1", "2"):
            held += on(tracks(camera, i, [("p", "Sad", 0.7)], t=1000.0 + i))
    assert len(held) == 1
    body = json.loads(held[0][1])
    assert (body["camera"], body["event"], body["label"], body["duration_s"]) == (
        "2",
        "emotion_held",
        "Sad",
        10.0,
    )
    assert body["rules"] == ["sad-on-camera-2"] and body["since"] == 1000.0


# --- webhooks ------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_event_is_lost_when_the_receiver_fails_its_first_two_tries(tmp_path):
    verify = documented_verify()
    n = 1000
    with Receiver(fail_first=2) as hook, running(make_service(tmp_path, [hook.url])) as publisher:
        messages = event_stream(n)
        publisher.send_all(messages)
        wait_for(lambda: len(hook.accepted) >= n, 30, 0.05, "every event accepted")
    bodies = hook.events()
    assert len(hook.posts) == 3 * n
    assert ids(bodies) == ids(json.loads(m[1]) for m in []) or len(set(ids(bodies))) == n
    assert [b["frame"] for b in bodies] == list(range(n))  # queue order: each track's order kept
    assert all(b["redelivered"] for b in bodies)  # each was tried before
    for headers, body in hook.accepted:
        assert verify(SECRET.encode(), body, headers["x-signature"])
        assert not verify(b"wrong", body, headers["x-signature"])
        assert headers["x-event-id"] == json.loads(body)["id"]


def test_a_delivery_is_dead_after_its_last_retry_logged_once_and_kept_bounded(tmp_path, caplog):
    with caplog.at_level(logging.INFO, "notifier"):
        with Receiver(fail_first=10**6) as hook:
            service = make_service(tmp_path, [hook.url], retries=2)
            outbox = service.outbox
            with running(service) as publisher:
                publisher.send_all(event_stream(8))
                wait_for(
                    lambda: len(outbox.dead_rows()) == 5 and not outbox.sizes(), 20, 0.05, "dead letters"
                )
                assert len(hook.posts) == 8 * 3
                dead = outbox.dead_rows()
    assert [json.loads(body)["frame"] for _, body, _ in dead] == [3, 4, 5, 6, 7]  # the newest 5 kept
    assert {error for _, _, error in dead} == {"HTTP 503"}
    assert caplog.text.count("is dead after 3 tries") == 8
    assert caplog.text.count("retrying with backoff") == 1


def test_backoff_doubles_up_to_its_limit_with_jitter():
    import random

    rng = random.Random(1)
    delays = [backoff(n, 0.5, 4.0, rng) for n in range(6)]
    for n, delay in enumerate(delays):
        full = min(4.0, 0.5 * 2**n)
        assert full / 2 <= delay <= full
    assert len({round(d / min(4.0, 0.5 * 2**n), 6) for n, d in enumerate(delays)}) > 1


# --- the queue -----------------------------------------------------------------------------


def test_the_queue_is_bounded_per_sink_and_drops_its_oldest(tmp_path):
    outbox = Outbox(tmp_path / "q.db", size=3)
    dropped = outbox.put([("a", str(i)) for i in range(5)] + [("b", "x")])
    assert dropped == {"a": 2}
    assert [r.body for r in outbox.take("a")] == ["2", "3", "4"] and outbox.sizes() == {"a": 3, "b": 1}


def test_queued_deliveries_outlive_the_process_and_come_back_marked(tmp_path):
    outbox = Outbox(tmp_path / "q.db")
    outbox.put([("a", "1"), ("a", "2")])
    first = outbox.take("a")
    outbox.done([first[0].seq])
    assert not any(r.recovered for r in first)
    again = Outbox(tmp_path / "q.db")  # as after kill -9: nothing closed
    assert [(r.body, r.recovered) for r in again.take("a")] == [("2", True)]
    again.put([("a", "3")])
    assert [(r.body, r.recovered) for r in again.take("a")] == [("2", True), ("3", False)]


# --- options and secrets -------------------------------------------------------------------


def test_passwords_and_tokens_are_masked_in_urls():
    assert mask_url("mqtts://ha:pa55@broker:8883") == "mqtts://ha:***@broker:8883"
    assert mask_url("https://u:p@hooks.example/x?token=abc") == "https://u:***@hooks.example/x?***"
    assert mask_url("mqtt://broker") == "mqtt://broker"


def test_options_make_settings_from_flags_env_and_secret_files(tmp_path, monkeypatch, capsys):
    (tmp_path / "secret").write_text("from-file\n")
    monkeypatch.setenv("EMOTION_WEBHOOK_URLS", "http://a/hook, https://b/hook")
    monkeypatch.setenv("EMOTION_MQTT_URL", "mqtt://user:pw@broker")
    monkeypatch.setenv("EMOTION_WEBHOOK_SECRET", "env-secret")
    parser = options.build_parser()
    assert "pw" not in parser.format_help() and "env-secret" not in parser.format_help()
    s = options.settings_from(parser.parse_args(["--webhook-secret-file", str(tmp_path / "secret")]))
    assert s.webhook.urls == ("http://a/hook", "https://b/hook") and s.webhook.secret == "from-file"
    assert s.mqtt.parts == ("broker", 1883, False, "user", "pw") and s.mqtt.discovery
    s = options.settings_from(parser.parse_args(["--webhook-url", "http://c/", "--mqtt-url", "mqtts://h"]))
    assert s.webhook.urls == ("http://c/",) and s.mqtt.parts[:3] == ("h", 8883, True)
    for argv, named in [
        (["--mqtt-url", "http://u:topsecret@h"], "--mqtt-url"),
        (["--webhook-url", "ftp://h"], "--webhook-url"),
        (["--mqtt-prefix", "a/#"], "--mqtt-prefix"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            options.settings_from(parser.parse_args(argv))
        err = capsys.readouterr().err
        assert stopped.value.code == 78 and named in err and "topsecret" not in err


def test_make_run_starts_the_notifier_only_when_a_sink_is_configured(monkeypatch):
    monkeypatch.delenv("EMOTION_MQTT_URL", raising=False)
    monkeypatch.delenv("EMOTION_WEBHOOK_URLS", raising=False)
    assert "notifier" not in [p.name for p in launch.run_plan()]
    monkeypatch.setenv("EMOTION_MQTT_URL", "mqtt://127.0.0.1")
    plan = launch.run_plan()
    assert plan[-1].name == "notifier" and plan[-1].metrics_port == 9107
    assert "notifier" in [p.name for p in launch.run_plan(notifier=True)]


# --- MQTT ----------------------------------------------------------------------------------

DISCOVERY_TOPIC = re.compile(r"^homeassistant/sensor/(?:[a-zA-Z0-9_-]+/)?[a-zA-Z0-9_-]+/config$")


def check_discovery(topic: str, config: dict, state: dict) -> None:
    """What Home Assistant's MQTT sensor needs of a discovery message (see docs/notifier.md)."""
    assert DISCOVERY_TOPIC.match(topic), topic
    assert isinstance(config["state_topic"], str) and "+" not in config["state_topic"]
    assert config["unique_id"] and config["device"]["identifiers"]  # a device needs a unique_id
    assert config["availability_topic"] and config["payload_available"] != config["payload_not_available"]
    assert config.get("state_class") in (None, "measurement", "total", "total_increasing")
    assert config.get("device_class") in (None, "enum")
    field = re.fullmatch(r"\{\{ value_json\.(\w+)(?: or 'none')? \}\}", config["value_template"]).group(1)
    value = state[field] if state[field] is not None else "none"
    if config.get("device_class") == "enum":
        assert value in config["options"] and "unit_of_measurement" not in config
    else:
        assert isinstance(value, int)


def test_discovery_messages_have_what_home_assistant_requires():
    settings = MqttSettings("mqtt://h", prefix="es")
    configs = discovery(settings, "front door/2")
    assert len(configs) == 2 and len({c["unique_id"] for _, c in configs}) == 2
    for topic, config in configs:
        check_discovery(topic, config, {"people": 0, "dominant": None})
        check_discovery(topic, config, {"people": 2, "dominant": "Sad"})
        assert config["state_topic"] == "es/front_door_2/state"


@needs_mosquitto
def test_mqtt_gets_events_state_availability_and_discovery(tmp_path):
    with mosq.Mosquitto() as broker, mosq.Subscriber(broker.port, "es/#", "homeassistant/#") as sub:
        service = make_service(tmp_path, mqtt_url=broker.url, prefix="es")
        with running(service) as publisher:
            publisher.send_all(
                [
                    event("cam1", 1, "a", "track_started", "Sad"),
                    event("cam1", 2, "b", "track_started", "Sad"),
                    event("cam1", 3, "a", "emotion_changed", "Happy", "Sad"),
                ]
            )
            wait_for(lambda: len(sub.received("es/cam1/events")) == 3, 10, 0.05, "events")
            wait_for(
                lambda: json.loads(sub.received("es/cam1/state")[-1])["emotions"].get("a") == "Happy",
                10,
                0.05,
            )
        wait_for(lambda: sub.received("es/available")[-1:] == [b"offline"], 10, 0.05, "offline on stop")
    events = [json.loads(m) for m in sub.received("es/cam1/events")]
    assert [e["event"] for e in events] == ["track_started", "track_started", "emotion_changed"]
    assert events[2]["previous"] == "Sad" and len({e["id"] for e in events}) == 3
    state = json.loads(sub.received("es/cam1/state")[-1])
    assert state == {**state, "people": 2, "dominant": "Happy", "emotions": {"a": "Happy", "b": "Sad"}}
    assert sub.received("es/available")[0] == b"online"
    retained = {m[0]: json.loads(m[1]) for m in sub.messages if m[0].startswith("homeassistant/")}
    assert len(retained) == 2
    for topic, config in retained.items():
        check_discovery(topic, config, state)


@needs_mosquitto
def test_no_event_is_lost_when_the_broker_restarts_mid_stream(tmp_path):
    n = 1000
    with mosq.Mosquitto(persistence=True) as broker:
        sub = mosq.Subscriber(broker.port, "es/+/events", client_id="counter", durable=True)
        service = make_service(tmp_path, mqtt_url=broker.url, prefix="es")
        (sink,) = service.sinks
        with running(service) as publisher:
            messages = event_stream(n)
            publisher.send_all(messages[: n // 2])
            wait_for(lambda: len(sub.received()) >= n // 4, 10, 0.01, "the stream under way")
            broker.restart()
            publisher.send_all(messages[n // 2 :])
            wait_for(lambda: len(set(sub.received())) == n, 30, 0.05, "every event at the subscriber")
        sub.close()
    frames = [json.loads(m)["frame"] for m in sub.received()]
    assert sorted(set(frames)) == list(range(n))
    assert sorted(set(frames), key=frames.index) == list(range(n))  # first arrivals in order
    redelivered = [json.loads(m) for m in sub.received() if b"redelivered" in m]
    assert len(frames) - n <= WINDOW and not redelivered  # duplicates: resent by paho, same id


@needs_mosquitto
def test_mqtts_with_a_user_and_password_and_a_wrong_password_refused(tmp_path, caplog):
    with mosq.Mosquitto(users={"ha": "pa55word"}, tls=True) as broker:
        url = broker.url.replace("//", "//ha:pa55word@")
        with mosq.Subscriber(broker.port, "es/#", auth=("ha", "pa55word"), ca_file=broker.ca_file) as sub:
            service = make_service(tmp_path, mqtt_url=url, prefix="es", ca_file=str(broker.ca_file))
            with running(service) as publisher:
                publisher.send_all([event("cam1", 1, "a", "track_started")])
                wait_for(lambda: sub.received("es/cam1/events"), 10, 0.05, "the event over TLS")
        bad_url = url.replace("pa55word", "guess")
        wrong = make_service(tmp_path / "wrong", mqtt_url=bad_url, prefix="es", ca_file=str(broker.ca_file))
        with caplog.at_level(logging.INFO, "notifier"), running(wrong):
            wait_for(lambda: "refused the connection" in caplog.text, 10, 0.05, "the refusal")
            assert not wrong.sinks[0].connected.is_set()
    assert "guess" not in caplog.text and "pa55word" not in caplog.text
    assert "mqtts://ha:***@localhost" in caplog.text


def test_a_track_whose_end_was_lost_leaves_the_state_after_a_minute(tmp_path):
    service = make_service(tmp_path)
    service.on_message(event("1", 0, "gone", "track_started", t=1000.0))
    service.on_message(event("1", 1, "here", "track_started", t=1000.0))
    service.on_message(tracks("1", 30, [("here", "Happy", 0.9)], t=1059.0))
    assert service.cameras.state("1")["people"] == 2
    service.on_message(tracks("1", 61, [("here", "Happy", 0.9)], t=1061.0))
    assert service.cameras.state("1")["emotions"] == {"here": "Happy"}


def test_cameras_that_come_and_go_leave_nothing_behind(tmp_path):
    """100 cameras added and removed: once each has been quiet for --stream-timeout-s, its
    state, cooldowns and the MQTT state sent on reconnect are gone; a camera still talking
    keeps its own."""
    from prometheus_client import REGISTRY

    now = [0.0]
    outbox = Outbox(tmp_path / "queue.db", 100, dead_size=5)
    (tmp_path / "rules.yaml").write_text(RULES_YAML)
    mqtt = MqttSink(MqttSettings("mqtt://127.0.0.1:9"), outbox)
    service = NotifierService(
        outbox,
        [mqtt],
        RulesFile(str(tmp_path / "rules.yaml")),
        lambda e: None,
        clock=lambda: now[0],
        stream_timeout_s=60,
    )

    def evicted() -> float:
        return REGISTRY.get_sample_value("emotion_notifier_streams_evicted_total") or 0

    before = evicted()
    for i in range(100):
        camera = f"cam-{i}"
        service.on_message(event(camera, 0, "p", "track_started", "Sad", t=1000.0))
        service.on_message(tracks(camera, 1, [("p", "Sad", 0.7)], t=1001.0))
        service.on_message(event(camera, 2, "p", "track_ended", "Sad", t=1002.0))
        now[0] += 0.5
    service.on_message(event("2", 0, "q", "track_started", "Sad", t=1000.0))
    assert len(service.cameras.times) == 101 and len(mqtt._states) == 101
    now[0] += 30
    service.on_message(tracks("2", 1, [("q", "Sad", 0.7)], t=1001.0))
    now[0] += 31
    service.housekeeping()
    assert evicted() - before == 100
    assert set(service.heard) == set(service.cameras.times) == set(mqtt._states) == {"2"}
    assert set(service.cameras.tracks) == {"2"} and {k[0] for k in service.cameras.seen} == {"2"}
    assert all(key[1] == "2" for key in service.cooldowns.last)
    assert service.cameras.state("2")["people"] == 1


def test_a_redirect_or_a_refusal_is_dead_at_once(tmp_path):
    for status in (302, 404):
        with Receiver(fail_first=10**6, fail_status=status) as hook:
            service = make_service(tmp_path / str(status), [hook.url])
            with running(service) as publisher:
                publisher.send_all(event_stream(1))
                wait_for(lambda s=service: s.outbox.dead_rows(), 10, 0.02, "the dead letter")
                assert len(hook.posts) == 1 and service.outbox.dead_rows()[0][2] == f"HTTP {status}"
