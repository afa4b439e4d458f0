"""The detector's options, and the settings they make."""

from __future__ import annotations

from services.common.config import service_parser

from .faces import DetectorSettings, load_cascade
from .regions import FaceFinder, RegionSettings
from .service import SERVICE, IntakeSettings


def build_parser():
    parser = service_parser(
        SERVICE, "Detector: pulls frames from the detect queue, finds faces, pushes crops to classify."
    )
    d = DetectorSettings()
    parser.option(
        "--cascade",
        default="haarcascade_frontalface_default.xml",
        help="Haar cascade file name in cv2.data.haarcascades, or a path",
    )
    parser.option("--scale-factor", default=d.scale_factor, type=float, help="Haar scaleFactor")
    parser.option("--min-neighbors", default=d.min_neighbors, type=int, help="Haar minNeighbors")
    parser.option(
        "--min-size", default=d.min_size, type=int, help="smallest face side, in full-resolution pixels"
    )
    parser.option(
        "--detect-width",
        default=d.detect_width,
        type=int,
        help="detect on a copy downscaled to this width (0 = full resolution)",
    )
    parser.option(
        "--margin",
        default=d.margin,
        type=float,
        help="margin added around each face crop, as a fraction of the box",
    )
    parser.option("--crop-size", default=d.crop_size, type=int, help="side of the face crops sent on")
    parser.option(
        "--equalize",
        default=d.equalize,
        type=bool,
        help="equalise the grey histogram before detection (for dim scenes)",
    )
    r = RegionSettings()
    parser.option(
        "--full-scan-every",
        default=r.full_scan_every,
        type=int,
        help="scan the whole frame every this many frames of a stream and only "
        "regions around known faces in between (1 = always the whole frame)",
    )
    parser.option(
        "--full-scan-ms",
        default=r.full_scan_ms,
        type=float,
        help="...and at least this often, in capture time (a new face is found within about this long)",
    )
    parser.option(
        "--region-grow",
        default=r.grow,
        type=float,
        help="a region is its face grown by this fraction of its side on each side",
    )
    parser.option(
        "--region-face-px",
        default=r.face_px,
        type=int,
        help="regions are scanned shrunk so that their face is this many pixels wide",
    )
    parser.option(
        "--max-age-ms",
        default=500.0,
        type=float,
        help="drop frames captured longer ago than this (0 = never)",
    )
    parser.option(
        "--newest-only",
        default=True,
        type=bool,
        help="work on the newest waiting frame of each stream and drop older ones "
        "(reason superseded); --no-newest-only takes every frame in order",
    )
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def face_finder(args) -> FaceFinder:
    settings = DetectorSettings(
        args.scale_factor,
        args.min_neighbors,
        args.min_size,
        args.detect_width,
        args.margin,
        args.crop_size,
        args.equalize,
    )
    regions = RegionSettings(
        args.full_scan_every, args.full_scan_ms, args.region_grow, face_px=args.region_face_px
    )
    return FaceFinder(load_cascade(args.cascade), settings, regions)


def settings_from(args) -> IntakeSettings:
    return IntakeSettings(
        max_age_s=args.max_age_ms / 1000.0,
        max_skew_s=args.max_clock_skew_ms / 1000.0,
        max_pixels=args.max_frame_pixels,
        newest_only=args.newest_only,
    )
