"""Models: a registry of MIL and pixel models (see registry.py) and the Bag they take."""

from .bag import Bag
from .registry import create_model, list_models, register_model

__all__ = ["Bag", "create_model", "list_models", "register_model"]
