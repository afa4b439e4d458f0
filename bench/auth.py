"""``python -m bench.auth``: what sign-in costs the live streams. One pipeline feeds two
viewers and two recorders at once, one pair with authentication off and one with it on, so
both see the same frames at the same moments on the same machine. Each viewer serves
``--clients`` MJPEG readers and ``--clients`` SSE readers of its ``/events/<stream>``; each
recorder serves ``--clients`` readers of ``/api/events/live``. The readers of the pair with
sign-in send a session as ``Authorization: Bearer``.

Per window of ``--seconds``: the CPU of each viewer per MJPEG picture it delivered, and of
each recorder per second; the figures are medians over ``--windows`` windows, with the ratio
on/off side by side. Writes bench/results/auth.json and auth.md. Target: at most 5 % extra.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import secrets
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from tests.support import free_port, wait_for
from tests.support.pipeline import Pipeline

from .common import RESULTS, busy_processes, find_media, log, model_registry, proc_cpu_seconds, temp_dir

TARGET_EXTRA = 0.05
STREAM = "bench"


class Reader(threading.Thread):
    """Reads a streaming response as fast as it comes and counts what it got: MJPEG parts
    (``--frame`` boundaries) or SSE messages (blank-line separated)."""

    def __init__(self, url: str, token: str | None, marker: bytes):
        super().__init__(daemon=True)
        self.url, self.token, self.marker = url, token, marker
        self.count = 0
        self.error = ""
        self.halt = threading.Event()

    def run(self):
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        while not self.halt.is_set():  # reconnects: a stream the viewer has not seen yet is a 404
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(self.url, headers=headers), timeout=30
                ) as body:
                    self._count(body)
            except (OSError, http.client.HTTPException) as error:
                self.error = f"{self.url}: {error}"
                self.halt.wait(0.2)

    def _count(self, body) -> None:
        tail = b""
        while not self.halt.is_set():
            chunk = body.read1(65536)
            if not chunk:
                return
            data = tail + chunk
            self.count += data.count(self.marker)
            tail = data[-len(self.marker) + 1 :]


def sign_in(recorder: str, password: str) -> str:
    request = urllib.request.Request(
        recorder + "/login",
        data=json.dumps({"username": "admin", "password": password}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())["token"]


def run(clip: Path, seconds: float, windows: int, clients: int, folder: Path) -> dict:
    registry, model = model_registry(folder)
    secret_file, password_file = folder / "secret", folder / "admin-password"
    secret_file.write_text(secrets.token_urlsafe(48))
    password = secrets.token_urlsafe(16)
    password_file.write_text(password)
    auth = ("--auth-secret-file", str(secret_file))
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(folder / "logs", registry)
    try:
        pipeline.start("tracker")
        recorders, viewers = {}, {"off": f"http://127.0.0.1:{pipeline.http_port}"}
        for mode in ("off", "on"):
            port = free_port()
            pipeline.start(
                f"recorder#{mode}",
                *("--database", str(folder / f"{mode}.db"), "--api-port", str(port)),
                *("--auth", mode, *auth, "--admin-password-file", str(password_file)),
            )
            recorders[mode] = f"http://127.0.0.1:{port}"
        viewer_port = free_port()
        pipeline.start(
            "viewer#on",
            *("--http-port", str(viewer_port), "--auth", "on", *auth, "--auth-url", recorders["on"]),
        )
        viewers["on"] = f"http://127.0.0.1:{viewer_port}"
        pipeline.group.wait_ready(120)
        pipeline.start("capture", "--source", str(clip), "--stream", STREAM, "--loop", "--fps", "15")
        token = wait_for(lambda: _try(sign_in, recorders["on"], password), 30, what="a sign-in")
        tokens = {"off": None, "on": token}
        readers: dict[str, list[Reader]] = {}
        for mode in ("off", "on"):
            mjpeg = [
                Reader(f"{viewers[mode]}/stream/{STREAM}.mjpg", tokens[mode], b"--frame\r\n")
                for _ in range(clients)
            ]
            sse = [Reader(f"{viewers[mode]}/events/{STREAM}", tokens[mode], b"\n\n") for _ in range(clients)]
            live = [
                Reader(f"{recorders[mode]}/api/events/live", tokens[mode], b"\n\n") for _ in range(clients)
            ]
            readers[f"mjpeg-{mode}"], readers[f"sse-{mode}"], readers[f"live-{mode}"] = mjpeg, sse, live
        every = [r for group in readers.values() for r in group]
        for reader in every:
            reader.start()
        wait_for(
            lambda: all(r.count > 5 for r in readers["mjpeg-off"] + readers["mjpeg-on"]), 60, what="pictures"
        )
        processes = {
            "viewer-off": pipeline.group["viewer"],
            "viewer-on": pipeline.group["viewer#on"],
            "recorder-off": pipeline.group["recorder#off"],
            "recorder-on": pipeline.group["recorder#on"],
        }
        rows = []
        for window in range(windows):
            cpu0 = {name: proc_cpu_seconds(p.pid) for name, p in processes.items()}
            count0 = {name: sum(r.count for r in group) for name, group in readers.items()}
            start = time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - start
            cpu1 = {name: proc_cpu_seconds(p.pid) for name, p in processes.items()}
            count1 = {name: sum(r.count for r in group) for name, group in readers.items()}
            counts = {name: count1[name] - count0[name] for name in readers}
            row = {"seconds": round(elapsed, 2), "delivered": counts}
            for mode in ("off", "on"):
                viewer_cpu = cpu1[f"viewer-{mode}"] - cpu0[f"viewer-{mode}"]
                recorder_cpu = cpu1[f"recorder-{mode}"] - cpu0[f"recorder-{mode}"]
                row[f"viewer_{mode}_ms_per_picture"] = 1000 * viewer_cpu / max(counts[f"mjpeg-{mode}"], 1)
                row[f"recorder_{mode}_cpu_percent"] = 100 * recorder_cpu / elapsed
            rows.append(row)
            log(f"  window {window + 1}/{windows}: {json.dumps(row)}")
        for reader in every:
            reader.halt.set()
        errors = sorted({r.error for r in every if r.error and r.count == 0})
    finally:
        pipeline.stop()

    def median(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    result = {"rows": rows, "errors": errors, "model": model}
    for part, key in (("viewer", "{}_ms_per_picture"), ("recorder", "{}_cpu_percent")):
        off, on = median(key.format(f"{part}_off")), median(key.format(f"{part}_on"))
        result[part] = {
            "off": round(off, 3),
            "on": round(on, 3),
            "ratio": round(on / off, 3) if off else None,
        }
    return result


def write_report(result: dict, args, path_json: Path, path_md: Path) -> None:
    path_json.write_text(json.dumps(result, indent=1) + "\n")
    viewer, recorder = result["viewer"], result["recorder"]
    lines = [
        "# Sign-in and the live streams",
        "",
        f"`python -m bench.auth --clients {args.clients} --seconds {args.seconds} --windows {args.windows}` "
        f"on {result['machine']}; {result['when']}. Other busy processes at start: "
        f"{', '.join(result['busy']) or 'none'}.",
        "",
        "One pipeline (woman2.mp4 looped at 15 fps) feeds two viewers and two recorders at once, "
        "one pair with authentication off and one with it on. Each viewer serves "
        f"{args.clients} MJPEG and {args.clients} SSE readers, each recorder {args.clients} readers "
        "of `/api/events/live`; medians over the windows.",
        "",
        "| | auth off | auth on | on / off |",
        "|---|---|---|---|",
        f"| viewer CPU ms per MJPEG picture delivered | {viewer['off']:.3f} | {viewer['on']:.3f} "
        f"| {viewer['ratio']} |",
        f"| recorder CPU % (SSE readers idle between events) | {recorder['off']:.2f} | {recorder['on']:.2f} "
        f"| {recorder['ratio']} |",
        "",
        f"Target: at most {TARGET_EXTRA:.0%} extra. Authentication is checked once per request, when a "
        "stream opens; the stream itself costs the same.",
    ]
    if result["errors"]:
        lines += ["", f"Reader errors: {'; '.join(result['errors'])}"]
    path_md.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.auth", description=__doc__.splitlines()[0])
    parser.add_argument("--media", help="folder with woman2.mp4 (default ../shared/media)")
    parser.add_argument("--clients", type=int, default=4, help="readers of each kind per server")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of one window")
    parser.add_argument("--windows", type=int, default=5, help="windows measured")
    parser.add_argument("--out", default=str(RESULTS), help="folder for auth.json and auth.md")
    args = parser.parse_args(argv)
    clip = find_media(args.media) / "woman2.mp4"
    busy = busy_processes()
    result = run(clip, args.seconds, args.windows, args.clients, temp_dir())
    result.update(
        machine=f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        busy=busy,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(result, args, out / "auth.json", out / "auth.md")
    log(f"viewer {result['viewer']}  recorder {result['recorder']}")


def _try(function, *args):
    try:
        return function(*args)
    except OSError:
        return None


if __name__ == "__main__":
    main()
