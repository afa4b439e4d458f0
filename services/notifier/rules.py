"""Rules: which events go to which sinks. They live in a TOML or YAML file (docs/notifier.md)
and are checked field by field; :class:`RulesFile` reloads the file when it changes and keeps
the rules in force when the new file is refused.

    [[rules]]
    name = "sad-on-camera-2"
    cameras = ["2"]                 # stream ids, * and ? globs; default: every camera
    events = ["emotion_held"]       # default: every event
    emotions = ["Sad"]              # the track's emotion; default: any
    min_confidence = 0.6            # the smoothed probability of that emotion
    min_duration_s = 10             # shown for at least this long (emotion_held, track_ended)
    cooldown_s = 60                 # per track: at most one match of this rule in this time
    sinks = ["webhook"]             # mqtt, webhook; default: every sink configured
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: YAML rule files only
    tomllib = None

from services.common.protocol import EMOTIONS, EVENTS

HELD = "emotion_held"  # made by the notifier: a track has shown one emotion for min_duration_s
NOTIFIER_EVENTS = (*EVENTS, HELD)
SINK_KINDS = ("mqtt", "webhook")
FIELDS = (
    "name",
    "cameras",
    "events",
    "emotions",
    "min_confidence",
    "min_duration_s",
    "cooldown_s",
    "sinks",
)

log = logging.getLogger("notifier")


class RuleError(ValueError):
    """A rule file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Rule:
    name: str
    cameras: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    emotions: tuple[str, ...] = ()
    min_confidence: float = 0.0
    min_duration_s: float = 0.0
    cooldown_s: float = 0.0
    sinks: tuple[str, ...] = SINK_KINDS

    def wants(self, event: str) -> bool:
        return not self.events or event in self.events

    def matches(
        self, camera: str, event: str, emotion: str, confidence: float | None, duration_s: float
    ) -> bool:
        """Every filter but the cooldown."""
        return (
            self.wants(event)
            and (not self.cameras or any(fnmatch.fnmatchcase(camera, c) for c in self.cameras))
            and (not self.emotions or emotion in self.emotions)
            and (not self.min_confidence or (confidence is not None and confidence >= self.min_confidence))
            and duration_s >= self.min_duration_s
        )


EVERYTHING = (Rule("all"),)  # no rule file: every event to every sink


def _strings(where: str, value, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RuleError(f"{where}: must be a list of names, got {value!r}")
    for v in value:
        if allowed is not None and v not in allowed:
            raise RuleError(f"{where}: {v!r} is not one of {', '.join(allowed)}")
    return tuple(value)


def _number(where: str, value, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        bounds = f"in [{low:g}, {high:g}]" if high < math.inf else f">= {low:g}"
        raise RuleError(f"{where}: must be a number {bounds}, got {value!r}")
    return float(value)


def parse_rule(where: str, item) -> Rule:
    if not isinstance(item, dict):
        raise RuleError(f"{where}: must be a table of fields, got {item!r}")
    unknown = sorted(set(item) - set(FIELDS))
    if unknown:
        raise RuleError(f"{where}.{unknown[0]}: unknown field (fields: {', '.join(FIELDS)})")
    name = item.get("name", where)
    if not isinstance(name, str) or not name:
        raise RuleError(f"{where}.name: must be a non-empty string, got {name!r}")
    return Rule(
        name=name,
        cameras=_strings(f"{where}.cameras", item.get("cameras", [])),
        events=_strings(f"{where}.events", item.get("events", []), NOTIFIER_EVENTS),
        emotions=_strings(f"{where}.emotions", item.get("emotions", []), EMOTIONS),
        min_confidence=_number(f"{where}.min_confidence", item.get("min_confidence", 0.0), 0.0, 1.0),
        min_duration_s=_number(f"{where}.min_duration_s", item.get("min_duration_s", 0.0), 0.0),
        cooldown_s=_number(f"{where}.cooldown_s", item.get("cooldown_s", 0.0), 0.0),
        sinks=_strings(f"{where}.sinks", item.get("sinks", list(SINK_KINDS)), SINK_KINDS),
    )


def parse_rules(document) -> tuple[Rule, ...]:
    if not isinstance(document, dict) or set(document) - {"rules"}:
        extra = sorted(set(document) - {"rules"}) if isinstance(document, dict) else []
        raise RuleError(f"{extra[0] if extra else 'top level'}: the file holds one list, 'rules'")
    items = document.get("rules", [])
    if not isinstance(items, list):
        raise RuleError(f"rules: must be a list of rules, got {items!r}")
    rules = tuple(parse_rule(f"rules[{i}]", item) for i, item in enumerate(items))
    names = [r.name for r in rules]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RuleError(f"rules[{i}].name: {name!r} is used twice")
    return rules


def load_rules(path: str | Path) -> tuple[Rule, ...]:
    """The rules of a .toml, .yaml or .yml file; RuleError names the file and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml" and tomllib is None:
            raise RuleError("TOML rule files need Python 3.11 or later; write the rules in YAML")
        if path.suffix == ".toml":
            document = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            document = yaml.safe_load(text) or {}
        else:
            raise RuleError("the file name must end in .toml, .yaml or .yml")
        return parse_rules(document)
    except RuleError as error:
        raise RuleError(f"{path}: {error}") from None
    except (
        OSError,
        UnicodeDecodeError,
        ValueError,
        yaml.YAMLError,
    ) as error:  # TOMLDecodeError is a ValueError
        raise RuleError(f"{path}: {error}") from None


class RulesFile:
    """The rules in force: those of ``path`` (all events to every sink without one), read
    again when the file's size or time changes (``check`` polls, cheaply)."""

    def __init__(self, path: str | Path = "", on_reload=lambda outcome: None):
        self.path = Path(path) if path else None
        self._on_reload = on_reload
        self._stamp = None
        self.rules: tuple[Rule, ...] = EVERYTHING
        if self.path is not None:
            self.rules = load_rules(self.path)  # a bad file at start-up stops the notifier
            self._stamp = self._file_stamp()

    def _file_stamp(self):
        try:
            stat = os.stat(self.path)
            return stat.st_mtime_ns, stat.st_size, stat.st_ino
        except OSError:
            return None

    def check(self) -> bool:
        """Reload if the file changed; True when new rules are in force."""
        if self.path is None:
            return False
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            rules = load_rules(self.path)
        except RuleError as error:
            log.error("rules not reloaded, the previous %d stay in force: %s", len(self.rules), error)
            self._on_reload("refused")
            return False
        self.rules = rules
        log.info("rules reloaded from %s: %s", self.path, ", ".join(r.name for r in rules) or "none")
        self._on_reload("ok")
        return True


@dataclass
class Cooldowns:
    """When each (rule, camera, track) last matched, to hold its next match for cooldown_s."""

    last: dict[tuple[str, str, str], float] = field(default_factory=dict)

    def ready(self, rule: Rule, camera: str, track: str, now: float) -> bool:
        if not rule.cooldown_s:
            return True
        key = (rule.name, camera, track)
        previous = self.last.get(key)
        if previous is not None and now - previous < rule.cooldown_s:
            return False
        self.last[key] = now
        return True

    def forget(self, camera: str, track: str | None = None) -> None:
        """Forget a track's cooldowns, or all of a camera's (``track`` None)."""
        for key in [k for k in self.last if k[1] == camera and track in (None, k[2])]:
            del self.last[key]
