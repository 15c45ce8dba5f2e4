"""mambapath: reproduce, compare and extend Mamba-based whole-slide-image models."""

__version__ = "0.1.0"
