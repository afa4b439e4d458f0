"""Optional native OpenCV windows (``--window``), one per stream, for a local desktop."""

from __future__ import annotations

import os
import sys

import cv2
import numpy as np

HINT = (
    "--window needs a desktop display and the GUI build of OpenCV: install `opencv-python` "
    "instead of `opencv-python-headless`, or drop --window and use the web page"
)


def _build_has_gui() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "GUI":
            return value.strip().upper() != "NONE"
    return True


def gui_problem() -> str | None:
    """Why native windows cannot work here, or None when they can.

    Nothing is opened before the display is known to exist: some GUI builds abort the
    whole process (rather than raising) when they cannot reach one.
    """
    if not _build_has_gui():
        return f"this OpenCV build has no GUI support. {HINT}"
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return f"no display (DISPLAY is not set). {HINT}"
    probe = "emotion-viewer-probe"
    try:
        cv2.namedWindow(probe, cv2.WINDOW_NORMAL)
        cv2.destroyWindow(probe)
    except cv2.error as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else "cv2.error"
        return f"OpenCV cannot open a window ({detail}). {HINT}"
    return None


class NativeWindows:
    """Shows each stream's composited frames; 'q' in any window asks the viewer to quit."""

    def __init__(self):
        self._open: set[str] = set()

    @staticmethod
    def title(stream: str) -> str:
        return f"emotion viewer - {stream}"

    def show(self, stream: str, image: np.ndarray) -> None:
        cv2.imshow(self.title(stream), image)
        self._open.add(stream)

    def remove(self, stream: str) -> None:
        if stream in self._open:
            self._open.discard(stream)
            cv2.destroyWindow(self.title(stream))

    def pump(self) -> bool:
        """Let the GUI process events; False once the user pressed 'q'."""
        if not self._open:
            return True
        return (cv2.waitKey(1) & 0xFF) != ord("q")

    def close(self) -> None:
        if self._open:
            cv2.destroyAllWindows()
            self._open.clear()
