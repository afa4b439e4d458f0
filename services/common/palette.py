"""The colour of each emotion, defined once: the viewer's boxes, the dashboard (served to the
page by the viewer), the recorder's charts and analyze's outputs all draw with it, so a
person comparing a live picture with a report reads the same emotion from the same colour.

Families a reader expects (Angry red, Disgust green, Fear purple, Happy yellow, Sad blue,
Surprise cyan, Neutral grey); the shades are picked so that every pair stays apart for
protan, deutan and tritan colour vision too, and each stands out on the dashboard's dark
background. The labels are always written as text as well; colour only repeats them.
"""

from __future__ import annotations

from services.common.protocol import EMOTIONS

# RGB hex, EMOTIONS order.
PALETTE: dict[str, str] = {
    "Angry": "#c6281c",
    "Disgust": "#1f9752",
    "Fear": "#76468d",
    "Happy": "#ffcc12",
    "Sad": "#1e55d6",
    "Surprise": "#08bfe1",
    "Neutral": "#b4b4b4",
}
UNKNOWN = "#ffffff"  # a label outside EMOTIONS (never sent by a valid classifier)


def hex_colour(emotion: str) -> str:
    """``#rrggbb`` of an emotion (matplotlib, HTML); UNKNOWN for anything else."""
    return PALETTE.get(emotion, UNKNOWN)


def hex_colours() -> list[str]:
    """The hex colours in EMOTIONS order, e.g. for matplotlib's ``stackplot(colors=...)``."""
    return [PALETTE[emotion] for emotion in EMOTIONS]


def bgr(emotion: str) -> tuple[int, int, int]:
    """The colour as OpenCV wants it: a (blue, green, red) tuple of 0-255 ints."""
    value = hex_colour(emotion)
    red, green, blue = (int(value[i : i + 2], 16) for i in (1, 3, 5))
    return (blue, green, red)
