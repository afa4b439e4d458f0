"""The camera inventory: ``cameras.yml``, a top-level ``cameras:`` list of maps, one a camera.

    cameras:
      - id: lobby                 # the stream id its frames carry (letters, digits, . _ -)
        source: rtsp://cam1/live  # anything --source takes
        name: Lobby entrance      # optional: shown on the dashboard (default: the id)
        location: building A      # optional
        fps: 15                   # optional: publishing rate (default 0: the source's own)
        max_width: 640            # optional: downscale wider frames (0 = never)
        loop: false               # optional: restart a file source at its end
        enabled: true             # optional: false keeps the entry but stops the camera
        detector:                 # optional: the detector's options for this camera alone
          blazeface_width: 320    #   also detect_width (Haar) and min_size

Capture runs every enabled camera of the file and follows its edits; the recorder's API
changes it (written back atomically, so a restart keeps the change). A bad entry is an
error naming the camera and the field; the other cameras are unaffected (docs/cameras.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import yaml

from services.common.protocol import DETECT_SETTINGS, detect_map_problem

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_TEXT = 200
MAX_SOURCE = 2048
MAX_FPS = 240.0
MAX_WIDTH = 8192
MAX_CAMERAS = 1000
MAX_FILE_BYTES = 1 << 20
STATE_TIMEOUT_S = 1.0  # longest wait for a capture process's /cameras
KEYS = ("id", "source", "name", "location", "fps", "max_width", "loop", "enabled", "detector")
HEADER = (
    "# Camera inventory (docs/cameras.md). Capture follows edits of this file by itself;\n"
    "# the recorder's API (/api/cameras) rewrites it, so comments other than this one are lost.\n"
)
USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")


class CameraError(ValueError):
    """One camera's entry is wrong: ``camera`` (its id, or #n), ``field`` and why."""

    def __init__(self, camera: str, field: str, message: str):
        super().__init__(f"camera {camera}: {field}: {message}")
        self.camera, self.field, self.reason = camera, field, message


class InventoryError(ValueError):
    """The file as a whole cannot be used (unreadable, not YAML, no ``cameras:`` list)."""


@dataclass(frozen=True)
class Camera:
    id: str
    source: str
    name: str = ""
    location: str = ""
    fps: float = 0.0
    max_width: int = 640
    loop: bool = False
    enabled: bool = True
    detector: tuple[tuple[str, int], ...] = ()  # (setting, value), sorted: DETECT_SETTINGS

    @property
    def title(self) -> str:
        return self.name or self.id

    @property
    def runs_as(self) -> tuple:
        """What capture runs the camera with: a change here restarts it (a new name or
        location does not)."""
        return (self.source, self.fps, self.max_width, self.loop, self.enabled, self.detector)

    def as_dict(self) -> dict:
        """The entry as written to the file: the defaults left out, id and source first."""
        defaults = Camera("", "")
        out: dict = {"id": self.id, "source": self.source}
        for key, value in asdict(self).items():
            if key not in out and value != getattr(defaults, key):
                out[key] = dict(value) if key == "detector" else value
        return out


@dataclass(frozen=True)
class Inventory:
    """The usable cameras of a file, and an error line for each entry that is not."""

    cameras: tuple[Camera, ...] = ()
    errors: tuple[str, ...] = ()
    entries: list = field(default_factory=list, compare=False)  # the raw maps, as read

    def get(self, camera_id: str) -> Camera | None:
        return next((c for c in self.cameras if c.id == camera_id), None)


def _label(entry, index: int) -> str:
    camera_id = entry.get("id") if isinstance(entry, dict) else None
    if isinstance(camera_id, str) and ID_PATTERN.match(camera_id):
        return repr(camera_id)
    return f"#{index + 1}"


def _text(label: str, key: str, value, most: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise CameraError(label, key, f"must be text, not {type(value).__name__}")
    text = str(value)
    if len(text) > most:
        raise CameraError(label, key, f"longer than {most} characters")
    if any(ord(ch) < 32 for ch in text):
        raise CameraError(label, key, "has control characters")
    return text


def _number(label: str, key: str, value, most: float, integer: bool = False) -> float | int:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CameraError(label, key, f"must be {kind} from 0 to {most:g}, not {value!r:.40}")
    if integer and value != int(value):
        raise CameraError(label, key, f"must be {kind} from 0 to {most:g}, not {value!r}")
    if not (math.isfinite(value) and 0 <= value <= most):
        raise CameraError(label, key, f"must be {kind} from 0 to {most:g}, not {value!r}")
    return int(value) if integer else float(value)


def _flag(label: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise CameraError(label, key, f"must be true or false, not {value!r:.40}")
    return value


def _detector(label: str, key: str, value) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, dict):
        raise CameraError(
            label, key, f"must be a map of the detector's settings ({', '.join(DETECT_SETTINGS)})"
        )
    wrong = detect_map_problem(value)
    if wrong:
        raise CameraError(label, f"{key}.{wrong[0]}", wrong[1])
    return tuple(sorted(value.items()))


def parse_camera(entry, index: int = 0) -> Camera:
    """One entry of the list as a Camera; CameraError names the camera and the field."""
    label = _label(entry, index)
    if not isinstance(entry, dict):
        raise CameraError(label, "entry", f"must be a map of keys, not {type(entry).__name__}")
    unknown = [str(k) for k in entry if k not in KEYS]
    if unknown:
        raise CameraError(label, unknown[0][:40], f"is not a camera key (keys: {', '.join(KEYS)})")
    for key in ("id", "source"):
        if entry.get(key) in (None, ""):
            raise CameraError(label, key, "is required")
    camera_id = _text(label, "id", entry["id"], 128)
    if not ID_PATTERN.match(camera_id):
        raise CameraError(
            label,
            "id",
            f"{camera_id!r:.60} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    source = _text(label, "source", entry["source"], MAX_SOURCE).strip()
    if not source:
        raise CameraError(label, "source", "is required")
    defaults = Camera(camera_id, source)

    def given(key: str, parse):
        value = entry.get(key)
        return getattr(defaults, key) if value is None else parse(label, key, value)

    return Camera(
        id=camera_id,
        source=source,
        name=given("name", partial(_text, most=MAX_TEXT)),
        location=given("location", partial(_text, most=MAX_TEXT)),
        fps=given("fps", partial(_number, most=MAX_FPS)),
        max_width=given("max_width", partial(_number, most=MAX_WIDTH, integer=True)),
        loop=given("loop", _flag),
        enabled=given("enabled", _flag),
        detector=given("detector", _detector),
    )


def parse_inventory(text: str, origin: str = "cameras.yml") -> Inventory:
    """The cameras of a file's text. A wrong entry (or a second one with an id already
    used) becomes an error line and is left out; the rest are used."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InventoryError(f"{origin}: not YAML: {exc}") from None
    if document is None:
        document = {"cameras": []}
    if not isinstance(document, dict) or "cameras" not in document:
        raise InventoryError(f"{origin}: must be a map with a 'cameras:' list")
    extra = [str(k) for k in document if k != "cameras"]
    if extra:
        raise InventoryError(f"{origin}: {extra[0][:40]!r} is not a top-level key (only 'cameras')")
    entries = document["cameras"] or []
    if not isinstance(entries, list):
        raise InventoryError(f"{origin}: 'cameras' must be a list of maps")
    if len(entries) > MAX_CAMERAS:
        raise InventoryError(f"{origin}: more than {MAX_CAMERAS} cameras")
    cameras: dict[str, Camera] = {}
    errors = []
    for index, entry in enumerate(entries):
        try:
            camera = parse_camera(entry, index)
        except CameraError as exc:
            errors.append(str(exc))
            continue
        if camera.id in cameras:
            errors.append(str(CameraError(repr(camera.id), "id", "is used by an earlier camera")))
            continue
        cameras[camera.id] = camera
    return Inventory(tuple(cameras.values()), tuple(errors), list(entries))


def read_inventory(path: str | Path) -> Inventory:
    """The file's cameras; InventoryError when it cannot be read or used at all."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise InventoryError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise InventoryError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    return parse_inventory(data.decode("utf-8", "replace"), str(path))


def signature(path: str | Path) -> tuple | None:
    """What changes when the file is edited or replaced (None while it is missing)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_size, st.st_dev)


def replica_of(camera_id: str, replicas: int) -> int:
    """The capture replica (0..replicas-1) that runs a camera: a stable hash of its id, the
    same in every process and on every machine."""
    return zlib.crc32(camera_id.encode()) % max(1, replicas)


def redact(text: str) -> str:
    """A source or message with the user and password of any URL in it replaced."""
    return USERINFO.sub(r"\1***@", text)


def live_states(urls, timeout: float = STATE_TIMEOUT_S) -> tuple[dict[str, dict], list[str]]:
    """Each camera's state as the capture processes at ``urls`` report it at ``/cameras``
    (their metrics port), and those that did not answer."""
    states: dict[str, dict] = {}
    unreachable = []
    for url in urls:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/cameras", timeout=timeout) as response:
                report = json.loads(response.read(MAX_FILE_BYTES))
            for camera in report.get("cameras", []):
                states[str(camera["id"])] = camera
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            unreachable.append(f"{url}: {exc}")
    return states, unreachable


class InventoryFile:
    """The file as the recorder's API changes it: each change reads the file, applies itself,
    checks the result and writes it to a temporary file renamed over the old one, under a
    lock, so a reader never sees half a file and two changes never lose one another."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read_only(self) -> str | None:
        """Why the file cannot be changed here (None when it can)."""
        folder = self.path.parent
        if not folder.is_dir():
            return f"{folder} does not exist"
        if not os.access(folder, os.W_OK):
            return (
                f"{folder} is read-only here (a Swarm config or Kubernetes ConfigMap is "
                "changed where it is defined, then rolled out)"
            )
        if self.path.exists() and not os.access(self.path, os.W_OK):
            return f"{self.path} is read-only"
        return None

    def read(self) -> Inventory:
        if not self.path.exists():
            return Inventory()
        return read_inventory(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def change(self, edit: Callable[[list], list]) -> Inventory:
        """Apply ``edit`` to the list of entries and write the result. ``edit`` raises
        CameraError (or KeyError for a camera that is not there) to refuse."""
        reason = self.read_only()
        if reason:
            raise PermissionError(reason)
        with self._locked():
            entries = [dict(e) if isinstance(e, dict) else e for e in self.read().entries]
            entries = edit(entries)
            text = HEADER + yaml.safe_dump({"cameras": entries}, sort_keys=False, allow_unicode=True)
            inventory = parse_inventory(text, str(self.path))
            fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
                if self.path.exists():
                    os.chmod(temp, self.path.stat().st_mode & 0o777)
                else:
                    os.chmod(temp, 0o644)
                os.replace(temp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            return inventory


def index_of(entries: list, camera_id: str) -> int:
    """Where the camera is in the raw list (KeyError when it is not)."""
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and entry.get("id") == camera_id:
            return index
    raise KeyError(camera_id)


def merged(entry: dict, changes: dict) -> Camera:
    """An entry of the file with ``changes`` applied, checked as a whole (a change can also
    mend an entry that was wrong); a key set to null goes back to its default. The id stays."""
    label = _label(entry, 0)
    if "id" in changes and changes["id"] != entry.get("id"):
        raise CameraError(label, "id", "cannot be changed (delete the camera and add it anew)")
    combined = {**entry, **changes}
    return parse_camera({k: v for k, v in combined.items() if v is not None})


def main(argv=None) -> int:
    """``python -m services.common.cameras cameras.yml``: check a file before using it; exit
    status 0 when every entry is good, 1 when some are wrong, 78 when it cannot be used."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m services.common.cameras", description="Check a camera inventory file."
    )
    parser.add_argument("file", help="the inventory, e.g. cameras.yml")
    args = parser.parse_args(argv)
    try:
        inventory = read_inventory(args.file)
    except InventoryError as exc:
        print(exc)
        return 78
    for camera in inventory.cameras:
        state = "" if camera.enabled else " (disabled)"
        own = ", ".join(f"{name} {value}" for name, value in camera.detector)
        settings = f" (detector: {own})" if own else ""
        print(f"{camera.id}: {redact(camera.source)}{state}{settings}")
    for error in inventory.errors:
        print(error)
    return 1 if inventory.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
