"""COSE: consistency-sensitivity evaluation of saliency methods on image classifiers."""

__version__ = "0.1.0"
