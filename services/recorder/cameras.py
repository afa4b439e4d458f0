"""The camera inventory over HTTP: ``GET``, ``POST /api/cameras``, ``GET``, ``PATCH`` and
``DELETE /api/cameras/{camera_id}``.

The inventory file (``--cameras``, the one capture runs) is the source of truth: a change
is checked, then written to the file atomically, and capture picks it up within a second;
a restart keeps it. Each camera is answered with its live state (up, down, retrying,
disabled), fps and last error, joined from what the capture processes serve at
``/cameras`` on their metrics port (``--capture-url``); ``unknown`` when none answers for
it. Changes are for admins (and written to the audit log); a principal limited to some
streams sees only those cameras. An inventory that cannot be written here (a Swarm config,
a Kubernetes ConfigMap) answers changes with 409 and the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from fastapi import Body, Depends, FastAPI, Query, Request

from services.auth.principal import Principal
from services.common.cameras import (
    Camera,
    CameraError,
    Inventory,
    InventoryError,
    InventoryFile,
    index_of,
    live_states,
    merged,
    parse_camera,
    redact,
)

from . import params
from .auth_routes import admin_of, client_of, principal_of

STATES = ("up", "down", "retrying", "disabled", "unknown")
NEW_CAMERA = Body(
    ...,
    examples=[{"id": "lobby", "source": "rtsp://cam1.local/live", "name": "Lobby", "fps": 15}],
    description="the camera's map, as in cameras.yml",
)
CAMERA_CHANGES = Body(..., examples=[{"enabled": False}], description="the keys to change; null: the default")


@dataclass(frozen=True)
class CameraSettings:
    """Where the inventory file is ("" = none) and the capture processes that run it."""

    path: str = ""
    capture_urls: tuple[str, ...] = ()


def camera_view(camera: Camera, live: dict | None) -> dict:
    """A camera as the API answers it: its entry (the source's password hidden; ``fps`` the
    rate asked for) and its state (``measured_fps`` the rate it publishes at)."""
    state = {"state": "unknown", "measured_fps": 0.0, "frames": 0, "last_error": ""}
    if not camera.enabled:
        state["state"] = "disabled"
    elif live is not None:
        state.update(
            state=str(live.get("state", "unknown")),
            measured_fps=float(live.get("fps", 0.0)),
            frames=int(live.get("frames", 0)),
            last_error=redact(str(live.get("last_error", ""))),
        )
    return {**asdict(camera), "source": redact(camera.source), "detector": dict(camera.detector), **state}


def add_camera_routes(
    app: FastAPI, settings: CameraSettings, audit: Callable[[Principal, str, str, Request], None]
) -> None:
    inventory_file = InventoryFile(settings.path) if settings.path else None

    def current() -> Inventory:
        if inventory_file is None:
            return Inventory()
        try:
            return inventory_file.read()
        except InventoryError as exc:
            raise params.HTTPException(409, f"inventory: {exc}") from None

    def change(edit) -> Inventory:
        if inventory_file is None:
            raise params.HTTPException(
                409, "inventory: none; start the recorder with --cameras FILE (EMOTION_CAMERAS)"
            )
        try:
            return inventory_file.change(edit)
        except PermissionError as exc:
            raise params.HTTPException(409, f"inventory: {exc}") from None
        except InventoryError as exc:
            raise params.HTTPException(409, f"inventory: {exc}") from None
        except CameraError as exc:
            raise params.HTTPException(400, str(exc)) from None
        except KeyError as exc:
            raise params.HTTPException(404, f"camera_id: no camera {exc.args[0]!r:.140}") from None
        except OSError as exc:
            raise params.HTTPException(409, f"inventory: cannot be written: {exc.strerror or exc}") from None

    def visible(principal: Principal, camera_id: str) -> None:
        if not principal.may_see(camera_id):
            raise params.HTTPException(403, f"camera_id: not yours to see: {camera_id[:128]!r}")

    def one(inventory: Inventory, camera_id: str) -> dict:
        camera = inventory.get(camera_id)
        if camera is None:
            raise params.HTTPException(404, f"camera_id: no camera {camera_id[:128]!r}")
        states, _ = live_states(settings.capture_urls) if camera.enabled else ({}, [])
        return camera_view(camera, states.get(camera.id))

    @app.get("/api/cameras", summary="The cameras of the inventory, each with its live state")
    def list_cameras(
        location: str | None = Query(None, description="only the cameras at this location"),
        state: str | None = Query(None, description="only the cameras in this state (up, down, ...)"),
        principal: Principal = Depends(principal_of),
    ):
        if state is not None and state not in STATES:
            raise params.bad("state", f"{state[:40]!r} is not one of {', '.join(STATES)}")
        inventory = current()
        states, unreachable = live_states(settings.capture_urls) if inventory.cameras else ({}, [])
        cameras = [
            camera_view(c, states.get(c.id))
            for c in inventory.cameras
            if principal.may_see(c.id) and location in (None, c.location)
        ]
        answer = {
            "inventory": settings.path or None,
            "read_only": inventory_file.read_only() if inventory_file else None,
            "cameras": [c for c in cameras if state in (None, c["state"])],
        }
        if principal.streams is None:
            answer["errors"] = list(inventory.errors)
            answer["unreachable"] = [redact(u) for u in unreachable]
        return answer

    @app.get("/api/cameras/{camera_id}", summary="One camera with its live state")
    def get_camera(camera_id: str, principal: Principal = Depends(principal_of)):
        visible(principal, camera_id)
        return one(current(), camera_id)

    @app.post(
        "/api/cameras", status_code=201, summary="Add a camera (admin); capture starts it within a second"
    )
    def add_camera(
        request: Request,
        entry: dict = NEW_CAMERA,
        admin: Principal = Depends(admin_of),
    ):
        try:
            camera = parse_camera(entry)
        except CameraError as exc:
            raise params.HTTPException(400, str(exc)) from None

        def add(entries: list) -> list:
            try:
                index_of(entries, camera.id)
            except KeyError:
                return [*entries, camera.as_dict()]
            raise params.HTTPException(409, f"id: camera {camera.id!r} exists (PATCH changes it)")

        inventory = change(add)
        audit(admin, "camera_added", camera.id, request)
        return one(inventory, camera.id)

    @app.patch(
        "/api/cameras/{camera_id}",
        summary="Change a camera (admin): the keys given, null for a default; capture restarts it",
    )
    def change_camera(
        camera_id: str,
        request: Request,
        changes: dict = CAMERA_CHANGES,
        admin: Principal = Depends(admin_of),
    ):
        def patch(entries: list) -> list:
            index = index_of(entries, camera_id)
            entries[index] = merged(entries[index], changes).as_dict()
            return entries

        inventory = change(patch)
        audit(admin, "camera_changed", camera_id, request)
        return one(inventory, camera_id)

    @app.delete("/api/cameras/{camera_id}", summary="Remove a camera (admin); capture stops it")
    def delete_camera(camera_id: str, request: Request, admin: Principal = Depends(admin_of)):
        def remove(entries: list) -> list:
            del entries[index_of(entries, camera_id)]
            return entries

        change(remove)
        audit(admin, "camera_removed", camera_id, request)
        return {"deleted": camera_id}


def audit_with(directory) -> Callable[[Principal, str, str, Request], None]:
    """The audit log entry of a camera change."""

    def audit(principal: Principal, action: str, target: str, request: Request) -> None:
        directory.audit(principal.name, action, target, client_of(request))

    return audit
