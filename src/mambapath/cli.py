"""The ``mambapath`` command line: one verb per pipeline stage.

Each verb lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their verb runs, so ``mambapath
--help`` stays fast and a stage never pays for another stage's imports.

Errors the user can fix (:class:`~mambapath.errors.MambapathError`) are printed as one
line without a traceback, and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import MambapathError

#: verb -> (module, one-line help). Order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "check-config": ("mambapath.config", "validate a workflow config and its cohort sheet"),
    "synth": ("mambapath.synth", "write a synthetic cohort of pyramidal slides with labels"),
    "gdc": ("mambapath.gdc", "query the GDC API for TCGA slides and cases; write manifests"),
    "download": ("mambapath.download", "download slides from the GDC with resume and md5 checks"),
    "cohort": ("mambapath.cohorts", "build the papers' TCGA cohort sheets from shipped tables"),
    "segment": ("mambapath.segment", "segment tissue: mask, GeoJSON contours, QC overlay, summary"),
    "tile": ("mambapath.tiling", "tile the tissue at a target mpp/magnification into an HDF5 coords file"),
    "extract": ("mambapath.features.extract", "extract tile features into an HDF5 features file"),
    "pixels": ("mambapath.pixel_data", "read a slide at a low magnification into an image for pixel models"),
    "split": ("mambapath.splits", "patient-level stratified k-fold splits; import and check papers' splits"),
    "train": ("mambapath.train", "train one method on one task and fold"),
    "evaluate": ("mambapath.evaluate", "metrics per fold and across folds"),
    "report": ("mambapath.report", "paper-style tables, figures and reproduced-vs-published page"),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mambapath",
        description="Mamba-based whole-slide-image pipeline: each verb is one Snakemake stage.",
    )
    parser.add_argument("--version", action="version", version=f"mambapath {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the verb is the first positional argument after the global options (--log-level takes a value)
    verb_finder = argparse.ArgumentParser(add_help=False)
    verb_finder.add_argument("--log-level")
    verb_finder.add_argument("verb", nargs="?")
    verb = verb_finder.parse_known_args(argv)[0].verb
    parser = build_parser(verb if verb in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = importlib.import_module(COMMANDS[args.verb][0])
    try:
        return int(module.run(args) or 0)
    except MambapathError as exc:
        print(f"mambapath {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
