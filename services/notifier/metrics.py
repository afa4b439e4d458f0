"""The notifier's Prometheus metrics (docs/notifier.md#metrics)."""

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

EVENTS = Counter("emotion_notifier_events_total", "Events taken from the tracks channel, by name", ["event"])
QUEUED = Counter(
    "emotion_notifier_queued_total", "Deliveries queued, by sink (an event a matching sink)", ["sink"]
)
DELIVERED = Counter(
    "emotion_notifier_delivered_total",
    "Deliveries confirmed by the sink (MQTT PUBACK, HTTP 2xx); redelivered: sent again, "
    "after a restart or a failed try (receivers drop duplicates by id)",
    ["sink", "redelivered"],
)
RETRIES = Counter("emotion_notifier_retries_total", "Failed webhook tries that are tried again", ["sink"])
DEAD = Counter(
    "emotion_notifier_dead_total",
    "Deliveries given up after the last retry (kept in the dead letters)",
    ["sink"],
)
QUEUE_SIZE = Gauge("emotion_notifier_queue_size", "Deliveries waiting for their sink, by sink", ["sink"])
QUEUE_LIMIT = Gauge("emotion_notifier_queue_limit", "Most deliveries a sink's queue holds (--queue-size)")
DELIVERY_SECONDS = Histogram(
    "emotion_notifier_delivery_seconds",
    "Time from queueing an event to its sink's confirmation",
    ["sink"],
    buckets=LATENCY_BUCKETS,
)
MQTT_CONNECTED = Gauge("emotion_notifier_mqtt_connected", "1 while connected to the MQTT broker")
RULE_RELOADS = Counter(
    "emotion_notifier_rule_reloads_total",
    "Rule file reloads: ok, or refused (previous rules kept)",
    ["outcome"],
)
RULES = Gauge("emotion_notifier_rules", "Rules in force")
EVICTED = Counter(
    "emotion_notifier_streams_evicted_total",
    "Cameras (stream ids) forgotten after --stream-timeout-s without a message",
)
DROPPED = Counter(
    "emotion_notifier_dropped_total",
    "Deliveries dropped, oldest first, because the sink's queue was full",
    ["sink"],
)
