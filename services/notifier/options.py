"""The notifier's options, and the settings they make."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from services.common.config import config_error, positive_int, service_parser, stream_timeout_option

from .mqtt import MqttSettings
from .rules import RuleError, load_rules
from .secret import mask_url, read_secret
from .service import SERVICE, NotifierSettings
from .webhook import WebhookSettings

WEBHOOK_URLS_ENV = "EMOTION_WEBHOOK_URLS"
EXAMPLE = """
Example, end to end: the pipeline's events to a local mosquitto and a webhook receiver, with
Home Assistant discovery on (its default) and only sad faces held for 10 s on camera 2 sent
to the webhook (details: [docs/notifier.md](notifier.md)):

```sh
mosquitto -p 1883 &                                   # or: docker compose --profile mqtt up
cat > rules.toml <<'TOML'
[[rules]]
name = "everything-to-mqtt"
sinks = ["mqtt"]

[[rules]]
name = "sad-on-camera-2"
cameras = ["2"]
events = ["emotion_held"]
emotions = ["Sad"]
min_duration_s = 10
sinks = ["webhook"]
TOML
export EMOTION_MQTT_URL=mqtt://127.0.0.1:1883 EMOTION_RULES=$PWD/rules.toml
export EMOTION_WEBHOOK_URLS=http://127.0.0.1:9000/hook EMOTION_WEBHOOK_SECRET=change-me
export EMOTION_STREAM=2                               # capture's stream id: "camera 2"
make run                                              # the notifier joins the pipeline
mosquitto_sub -v -t 'emotion-stream/#'                # events, state, availability
```
"""


def secret_option(parser, flag: str, env: str, help: str) -> None:
    """An option whose value --help and the logs never show."""
    parser.add_argument(flag, default=os.environ.get(env, ""), help=f"{help} [env {env}, default: none]")


def build_parser():
    parser = service_parser(
        SERVICE,
        "Notifier: sends the tracker's events to MQTT (with Home Assistant discovery) and "
        "signed webhooks, as rules say, at least once",
    )
    d, m, w = NotifierSettings(), MqttSettings(""), WebhookSettings()
    parser.option(
        "--rules",
        default="",
        help="rule file (.toml, .yaml): which events go to which sinks, reloaded when it "
        "changes (docs/notifier.md#rules); empty = every event to every sink",
    )
    stream_timeout_option(parser, "its people, cooldowns and MQTT state")
    parser.option(
        "--queue-file",
        default="data/notifier/queue.db",
        help="SQLite file of the deliveries not yet confirmed, kept across restarts (empty = in memory only)",
    )
    parser.option(
        "--queue-size",
        default=d.queue_size,
        type=positive_int,
        help="most deliveries queued per sink; then the oldest are dropped",
    )
    parser.option(
        "--dead-letter-size",
        default=d.dead_letter_size,
        type=positive_int,
        help="most dead deliveries kept (table 'dead' of the queue file)",
    )
    secret_option(
        parser,
        "--mqtt-url",
        "EMOTION_MQTT_URL",
        "MQTT broker: mqtt://[user:password@]host[:1883], mqtts:// for TLS (empty = no MQTT)",
    )
    parser.option(
        "--mqtt-prefix",
        default=m.prefix,
        help="first level of every topic: <prefix>/<camera>/events, .../state, <prefix>/available",
    )
    parser.option("--mqtt-client-id", default=m.client_id, help="the MQTT client id (unique per notifier)")
    parser.option(
        "--mqtt-keepalive-s",
        default=m.keepalive_s,
        type=positive_int,
        help="MQTT keepalive: the broker publishes the offline will within 1.5x this after the notifier dies",
    )
    parser.option("--mqtt-username", default="", help="MQTT user name (default: the URL's)")
    secret_option(parser, "--mqtt-password", "EMOTION_MQTT_PASSWORD", "MQTT password (default: the URL's)")
    parser.option(
        "--mqtt-password-file",
        default="",
        help="file holding the MQTT password (a Docker or Kubernetes secret)",
    )
    parser.option(
        "--mqtt-ca-file", default="", help="mqtts: CA certificate(s) of the broker (default: the system's)"
    )
    parser.option(
        "--mqtt-tls-insecure", default=False, type=bool, help="mqtts: do not check the broker's host name"
    )
    parser.option(
        "--ha-discovery",
        default=True,
        type=bool,
        help="publish Home Assistant MQTT discovery (a device per camera)",
    )
    parser.option(
        "--ha-discovery-prefix", default=m.discovery_prefix, help="Home Assistant's discovery prefix"
    )
    parser.add_argument(
        "--webhook-url",
        action="append",
        default=None,
        help="POST each event here; repeat for several (in the variable: comma-separated) "
        f"[env {WEBHOOK_URLS_ENV}, default: none]",
    )
    secret_option(
        parser,
        "--webhook-secret",
        "EMOTION_WEBHOOK_SECRET",
        "shared secret of the X-Signature HMAC-SHA256 header",
    )
    parser.option(
        "--webhook-secret-file",
        default="",
        help="file holding the webhook secret (a Docker or Kubernetes secret)",
    )
    parser.option(
        "--webhook-retries",
        default=w.retries,
        type=int,
        help="tries after the first before a delivery is dead",
    )
    parser.option(
        "--webhook-backoff-ms",
        default=w.backoff_s * 1000,
        type=float,
        help="wait before the first retry; doubles each retry (with jitter)",
    )
    parser.option(
        "--webhook-max-backoff-ms",
        default=w.max_backoff_s * 1000,
        type=float,
        help="longest wait between tries",
    )
    parser.option(
        "--webhook-timeout-ms",
        default=w.timeout_s * 1000,
        type=float,
        help="longest wait for a receiver's answer",
    )
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def webhook_urls(args) -> tuple[str, ...]:
    urls = args.webhook_url or [u for u in os.environ.get(WEBHOOK_URLS_ENV, "").split(",")]
    urls = tuple(u.strip() for u in urls if u.strip())
    for url in urls:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            config_error(SERVICE, f"--webhook-url {mask_url(url)} is not an http:// or https:// URL")
    return urls


def settings_from(args) -> NotifierSettings:
    """The settings, or exit 78 naming the option that is wrong (secrets masked)."""
    if args.rules:
        try:
            load_rules(args.rules)
        except RuleError as error:
            config_error(SERVICE, f"--rules {error}")
    try:
        mqtt_password = read_secret(args.mqtt_password, args.mqtt_password_file)
        webhook_secret = read_secret(args.webhook_secret, args.webhook_secret_file)
    except OSError as error:
        config_error(SERVICE, f"secret file: {error}")
    mqtt = None
    if args.mqtt_url:
        mqtt = MqttSettings(
            args.mqtt_url,
            args.mqtt_prefix.strip("/"),
            args.mqtt_client_id,
            args.mqtt_keepalive_s,
            args.mqtt_username,
            mqtt_password,
            args.mqtt_ca_file,
            args.mqtt_tls_insecure,
            args.ha_discovery,
            args.ha_discovery_prefix.strip("/"),
        )
        try:
            _ = mqtt.parts
        except ValueError as error:
            config_error(SERVICE, f"--mqtt-url {error}")
        if not mqtt.prefix or any(c in mqtt.prefix for c in "+#"):
            config_error(SERVICE, f"--mqtt-prefix {args.mqtt_prefix!r} must be a topic without + or #")
    if args.webhook_retries < 0 or min(args.webhook_backoff_ms, args.webhook_timeout_ms) <= 0:
        config_error(
            SERVICE, "--webhook-retries must be >= 0, --webhook-backoff-ms and --webhook-timeout-ms > 0"
        )
    webhook = WebhookSettings(
        webhook_urls(args),
        webhook_secret,
        args.webhook_retries,
        args.webhook_backoff_ms / 1000,
        max(args.webhook_backoff_ms, args.webhook_max_backoff_ms) / 1000,
        args.webhook_timeout_ms / 1000,
    )
    return NotifierSettings(
        mqtt, webhook, args.rules, args.queue_file, args.queue_size, args.dead_letter_size
    )
