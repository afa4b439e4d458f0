"""The camera inventory file: parsing, the errors that name the camera and the field, the
changes that leave other cameras alone, atomic rewrites, replicas."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from services.common.cameras import (
    Camera,
    CameraError,
    InventoryError,
    InventoryFile,
    index_of,
    main,
    merged,
    parse_camera,
    parse_inventory,
    read_inventory,
    redact,
    replica_of,
)

GOOD = """
cameras:
  - id: lobby
    source: demo
    name: Lobby
    location: building A
    fps: 15
  - id: lab
    source: clips/woman2.mp4
    loop: true
    max_width: 320
  - {id: spare, source: "0", enabled: false}
"""


def test_a_good_file_gives_its_cameras_with_defaults():
    inventory = parse_inventory(GOOD)
    assert inventory.errors == ()
    lobby, lab, spare = inventory.cameras
    assert lobby == Camera("lobby", "demo", name="Lobby", location="building A", fps=15.0)
    assert lab.loop and lab.max_width == 320 and lab.fps == 0 and lab.title == "lab"
    assert not spare.enabled and spare.source == "0"
    assert lab.as_dict() == {"id": "lab", "source": "clips/woman2.mp4", "max_width": 320, "loop": True}


@pytest.mark.parametrize(
    "entry, field, words",
    [
        ({"source": "demo"}, "id", "required"),
        ({"id": "a b", "source": "demo"}, "id", "letters, digits"),
        ({"id": "x" * 129, "source": "demo"}, "id", "longer than 128"),
        ({"id": "cam", "source": ""}, "source", "required"),
        ({"id": "cam", "source": ["demo"]}, "source", "must be text"),
        ({"id": "cam", "source": "demo", "fps": "fast"}, "fps", "number from 0 to 240"),
        ({"id": "cam", "source": "demo", "fps": -1}, "fps", "number from 0 to 240"),
        ({"id": "cam", "source": "demo", "fps": float("nan")}, "fps", "number"),
        ({"id": "cam", "source": "demo", "max_width": 1.5}, "max_width", "integer"),
        ({"id": "cam", "source": "demo", "loop": "yes"}, "loop", "true or false"),
        ({"id": "cam", "source": "demo", "enabled": 1}, "enabled", "true or false"),
        ({"id": "cam", "source": "demo", "fsp": 15}, "fsp", "not a camera key"),
        ({"id": "cam", "source": "demo", "name": "a\nb"}, "name", "control characters"),
        ({"id": "cam", "source": "demo", "detector": 320}, "detector", "map of the detector's settings"),
        (
            {"id": "cam", "source": "demo", "detector": {"width": 320}},
            "detector.width",
            "not a detector setting",
        ),
        (
            {"id": "cam", "source": "demo", "detector": {"min_size": -1}},
            "detector.min_size",
            "from 1 to 2048",
        ),
        ("demo", "entry", "map"),
    ],
)
def test_a_wrong_entry_names_the_camera_and_the_field(entry, field, words):
    with pytest.raises(CameraError) as caught:
        parse_camera(entry, 2)
    assert caught.value.field == field
    assert words in str(caught.value)
    expected = "'cam'" if isinstance(entry, dict) and entry.get("id") == "cam" else "#3"
    assert str(caught.value).startswith(f"camera {expected}: {field}: ")


def test_wrong_entries_are_left_out_and_the_others_kept():
    inventory = parse_inventory(
        GOOD
        + """
  - {id: broken, source: demo, fps: fast}
  - {id: lobby, source: demo}
  - just a string
"""
    )
    assert [c.id for c in inventory.cameras] == ["lobby", "lab", "spare"]
    assert inventory.errors == (
        "camera 'broken': fps: must be a number from 0 to 240, not 'fast'",
        "camera 'lobby': id: is used by an earlier camera",
        "camera #6: entry: must be a map of keys, not str",
    )


@pytest.mark.parametrize(
    "text, words",
    [
        ("cameras: [", "not YAML"),
        ("- id: a", "a map with a 'cameras:' list"),
        ("cameras: {id: a}", "must be a list"),
        ("cameras: []\nextra: 1", "not a top-level key"),
        ("cameras: !!python/object:os.system {}", "not YAML"),
    ],
)
def test_a_file_that_cannot_be_used_at_all_says_why(text, words):
    with pytest.raises(InventoryError, match=words):
        parse_inventory(text, "site.yml")


def test_an_empty_file_has_no_cameras(tmp_path):
    path = tmp_path / "cameras.yml"
    path.write_text("")
    assert read_inventory(path).cameras == ()
    with pytest.raises(InventoryError, match="cannot be read"):
        read_inventory(tmp_path / "missing.yml")


def test_a_camera_s_detector_settings_are_kept_in_order_and_written_back():
    (camera,) = parse_inventory(
        "cameras:\n  - {id: hall, source: demo, detector: {min_size: 20, blazeface_width: 320}}\n"
    ).cameras
    assert camera.detector == (("blazeface_width", 320), ("min_size", 20))
    assert camera.as_dict() == {
        "id": "hall",
        "source": "demo",
        "detector": {"blazeface_width": 320, "min_size": 20},
    }
    assert merged(camera.as_dict(), {"detector": None}).detector == ()


def test_only_what_capture_runs_with_restarts_a_camera():
    lobby = parse_inventory(GOOD).get("lobby")
    assert merged(lobby.as_dict(), {"name": "Hall", "location": "B"}).runs_as == lobby.runs_as
    changes = ({"fps": 10}, {"source": "0"}, {"max_width": 0}, {"loop": True}, {"enabled": False})
    for change in (*changes, {"detector": {"min_size": 40}}):
        assert merged(lobby.as_dict(), change).runs_as != lobby.runs_as, change


def test_replicas_split_the_cameras_stably():
    ids = [f"cam{i}" for i in range(300)]
    shares = [sum(replica_of(i, 3) == r for i in ids) for r in range(3)]
    assert sum(shares) == 300 and min(shares) > 70
    assert all(replica_of(i, 1) == 0 for i in ids)
    assert replica_of("lobby", 4) == replica_of("lobby", 4)


def test_passwords_in_urls_are_redacted():
    assert (
        redact("cannot open stream rtsp://admin:s3cret@cam/live") == "cannot open stream rtsp://***@cam/live"
    )
    assert redact("clips/a.mp4") == "clips/a.mp4"


def test_a_change_is_checked_whole_and_keeps_the_id():
    entry = {"id": "lab", "source": "demo", "fps": "fast"}
    assert merged(entry, {"fps": 5}) == Camera("lab", "demo", fps=5.0)
    assert merged({"id": "lab", "source": "demo", "fps": 5}, {"fps": None}).fps == 0
    with pytest.raises(CameraError, match="id: cannot be changed"):
        merged(entry, {"id": "other"})
    with pytest.raises(CameraError, match="loop: must be true or false"):
        merged(entry, {"fps": 5, "loop": "no"})


def test_the_file_is_rewritten_atomically_and_changes_do_not_lose_one_another(tmp_path):
    path = tmp_path / "cameras.yml"
    path.write_text(GOOD)
    os.chmod(path, 0o640)
    inventory_file = InventoryFile(path)
    assert inventory_file.read_only() is None

    def add(n):
        inventory_file.change(lambda entries: [*entries, {"id": f"cam{n}", "source": "demo"}])

    threads = [threading.Thread(target=add, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    inventory = read_inventory(path)
    assert {c.id for c in inventory.cameras} == {"lobby", "lab", "spare", *(f"cam{n}" for n in range(8))}
    assert inventory.get("lobby").location == "building A"
    assert oct(path.stat().st_mode & 0o777) == "0o640"
    assert path.read_text().startswith("# Camera inventory")
    assert [p.name for p in tmp_path.iterdir() if p.name != "cameras.yml"] == [".cameras.yml.lock"]

    def remove_lab(entries):
        del entries[index_of(entries, "lab")]
        return entries

    assert [c.id for c in inventory_file.change(remove_lab).cameras][:2] == ["lobby", "spare"]
    with pytest.raises(KeyError):
        inventory_file.change(remove_lab)


def read_only_folder(tmp_path):
    """A folder this process cannot write: chmod'ed, or (as root) /proc/sys."""
    folder = tmp_path / "config"
    folder.mkdir()
    os.chmod(folder, 0o555)
    if not os.access(folder, os.W_OK):
        return folder
    if os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
        return Path("/proc/sys")
    pytest.skip("no read-only folder here")


def test_a_read_only_folder_is_reported(tmp_path):
    inventory_file = InventoryFile(read_only_folder(tmp_path) / "cameras.yml")
    assert "read-only" in inventory_file.read_only()
    with pytest.raises(PermissionError, match="read-only"):
        inventory_file.change(lambda entries: entries)


def test_a_file_is_checked_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "cameras.yml"
    path.write_text(GOOD)
    assert main([str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "lobby: demo",
        "lab: clips/woman2.mp4",
        "spare: 0 (disabled)",
    ]
    path.write_text(GOOD + "  - {id: hall, source: demo, detector: {min_size: 20, blazeface_width: 320}}\n")
    assert main([str(path)]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1] == "hall: demo (detector: blazeface_width 320, min_size 20)"
    )
    path.write_text(GOOD + "  - {id: x, source: demo, fps: fast}\n")
    assert main([str(path)]) == 1
    assert (
        capsys.readouterr().out.splitlines()[-1]
        == "camera 'x': fps: must be a number from 0 to 240, not 'fast'"
    )
    assert main([str(tmp_path / "missing.yml")]) == 78
