"""Who is asking: a user or an API token, its role and the streams it may see."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("admin", "viewer")


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    streams: tuple[str, ...] | None = None  # None: every stream
    kind: str = "user"  # user, token or anonymous (authentication off)

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, stream: str) -> bool:
        return self.streams is None or stream in self.streams

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "role": self.role,
            "streams": None if self.streams is None else list(self.streams),
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Principal:
        streams = data.get("streams")
        return cls(
            str(data["name"]),
            str(data["role"]),
            None if streams is None else tuple(str(s) for s in streams),
            str(data.get("kind", "user")),
        )


# Everyone, when authentication is off (allowed on loopback only).
ANONYMOUS = Principal("anonymous", "admin", None, "anonymous")


def parse_streams(text: str | None) -> tuple[str, ...] | None:
    """``a,b`` -> ("a", "b"); empty or None -> None (every stream)."""
    if not text:
        return None
    streams = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    return streams or None
