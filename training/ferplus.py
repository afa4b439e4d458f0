"""FER+ votes in the row order of a FER2013 CSV whose pixels are the FER+ images' own.

Microsoft's ``fer2013new.csv`` lists the taggers' votes per FER+ image (``fer0000000.png``
...), in the original Kaggle order. A CSV rebuilt from those images (see docs/models.md,
"Getting FER2013") holds each face's exact pixels, so every row finds its image by the
pixels alone: no nearest-neighbour guess. A face whose pixels match no image, or several
images with different votes (FER2013 holds duplicate faces), gets no votes (an empty
``Image name`` and zero counts), which leaves its FER2013 label as its only target.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2

from .data import TEST, TRAIN, VAL, DataError, load_csv

# The FER+ image folders of each split (microsoft/FERPlus's layout).
FOLDERS = {TRAIN: "FER2013Train", VAL: "FER2013Valid", TEST: "FER2013Test"}


def align_votes(csv_path, fer2013new, png_root, out) -> dict[str, tuple[int, int]]:
    """Write ``out``: one row of ``fer2013new``'s columns per row of ``csv_path``, in its
    order, matched by exact pixels within the split. Returns {split: (matched, rows)}."""
    dataset = load_csv(Path(csv_path))
    with open(fer2013new, newline="") as f:
        table = list(csv.reader(f))
    header, by_name = table[0], {row[1].strip(): row for row in table[1:] if len(row) > 1 and row[1].strip()}
    if header[:2] != ["Usage", "Image name"]:
        raise DataError(
            f"{fer2013new}:1: expected the columns Usage, Image name, neutral, ... of fer2013new.csv"
        )
    counts = {}
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for split, folder in FOLDERS.items():
            faces = dataset.splits[split].faces
            images = sorted((Path(png_root) / folder).glob("fer*.png"))
            if len(faces) and not images:
                raise DataError(f"{Path(png_root) / folder}: no fer*.png images")
            votes_of: dict[bytes, set] = {}
            for image in images:
                pixels = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)
                row = by_name.get(image.name)
                if pixels is not None and row is not None:
                    votes_of.setdefault(pixels.tobytes(), set()).add(tuple(row[1:]))
            matched = 0
            for face in faces:
                found = votes_of.get(face.tobytes(), set())
                votes = {row[1:] for row in found}
                if len(votes) == 1:
                    writer.writerow([split, *min(found)])
                    matched += 1
                else:
                    writer.writerow([split, ""] + ["0"] * (len(header) - 2))
            counts[split] = (matched, len(faces))
    return counts


def run(args) -> int:
    counts = align_votes(args.data, args.fer2013new, args.images, args.out)
    for split, (matched, rows) in counts.items():
        print(f"{split}: {matched} of {rows} faces matched to their FER+ votes")
    print(f"wrote {args.out}")
    return 0
