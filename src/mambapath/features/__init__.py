"""Tile features: an extractor registry (extractors.py), tile reading (dataset.py) and the
``mambapath extract`` stage (extract.py) that writes one features HDF5 per slide."""

from .extractors import Extractor, create_extractor, list_extractors, register_extractor

__all__ = ["Extractor", "create_extractor", "list_extractors", "register_extractor"]
