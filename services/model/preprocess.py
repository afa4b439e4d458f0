"""The one transformation from a face crop to a model input, shared by training and serving.

A model's ``metadata.json`` stores its :class:`InputSpec`; the classifier rebuilds the
spec from there, so a served model always sees exactly what it was trained on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np

SCALINGS = ("unit", "symmetric")  # [0, 1] or [-1, 1] (MobileNetV2's convention)
# How each face's contrast is normalised at the model's size, before scaling: not at all,
# cv2.equalizeHist, or CLAHE (contrast-limited, tile by tile). Colour faces are normalised
# on their luma only.
NORMALISATIONS = ("none", "equalize", "clahe")
CLAHE_CLIP, CLAHE_TILES = 2.0, 6  # CLAHE over 6 x 6 tiles (8 px each at 48 px)


@dataclass(frozen=True)
class InputSpec:
    size: int = 48  # square side in pixels
    channels: int = 1  # 1 = grayscale, 3 = RGB
    scaling: str = "unit"
    normalisation: str = "none"

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, not {self.scaling!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, not {self.normalisation!r}")
        if not 8 <= self.size <= 512:
            raise ValueError(f"input size {self.size} outside 8..512")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.channels)

    def to_dict(self) -> dict:
        """The spec for metadata.json; "normalisation" only when there is one, so a spec
        without reads as it did before the field existed."""
        data = asdict(self)
        if self.normalisation == "none":
            del data["normalisation"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> InputSpec:
        """Metadata written before ``normalisation`` existed means none, as it was served then."""
        return cls(
            size=int(data["size"]),
            channels=int(data["channels"]),
            scaling=str(data["scaling"]),
            normalisation=str(data.get("normalisation", "none")),
        )

    def network(self) -> InputSpec:
        """The spec without the normalisation: what fixes the network's input tensor, so
        weights move between specs that differ only in it (fine-tuning)."""
        return replace(self, normalisation="none")


def normalise(face: np.ndarray, normalisation: str) -> np.ndarray:
    """One uint8 face, grey (H, W) or colour (H, W, 3), with its contrast normalised."""
    if normalisation == "none":
        return face
    if face.ndim == 3:
        ycc = cv2.cvtColor(face, cv2.COLOR_RGB2YCrCb)
        ycc[:, :, 0] = normalise(np.ascontiguousarray(ycc[:, :, 0]), normalisation)
        return cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB)
    if normalisation == "equalize":
        return cv2.equalizeHist(face)
    return cv2.createCLAHE(CLAHE_CLIP, (CLAHE_TILES, CLAHE_TILES)).apply(face)


def preprocess_faces(faces: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 faces, (N, H, W) grey or (N, H, W, 3) BGR, any size -> float32 (N, S, S, C).

    Grey faces given to a colour model are repeated over 3 channels, so a model trained
    on grey FER2013 and one trained on colour folders accept the same crops. The spec's
    normalisation acts on the face at the model's size, the size training faces have.
    """
    faces = np.asarray(faces)
    if faces.dtype != np.uint8 or faces.ndim not in (3, 4):
        raise ValueError(f"expected uint8 (N,H,W) or (N,H,W,3) faces, got {faces.dtype} {faces.shape}")
    n = faces.shape[0]
    out = np.empty((n, spec.size, spec.size, spec.channels), np.float32)
    for i in range(n):
        face = faces[i]
        if face.ndim == 3 and spec.channels == 1:
            face = cv2.cvtColor(face, cv2.COLOR_BGR2GRAY)
        elif face.ndim == 3:
            face = cv2.cvtColor(face, cv2.COLOR_BGR2RGB)
        if face.shape[0] != spec.size or face.shape[1] != spec.size:
            shrink = face.shape[0] > spec.size
            face = cv2.resize(
                face, (spec.size, spec.size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            )
        face = normalise(face, spec.normalisation)
        if face.ndim == 2:
            face = face[:, :, None]
        out[i] = face if face.shape[2] == spec.channels else np.repeat(face, spec.channels, axis=2)
    if spec.scaling == "unit":
        out *= 1.0 / 255.0
    else:
        out *= 2.0 / 255.0
        out -= 1.0
    return out
