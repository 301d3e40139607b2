"""Corral: the whole Llama 3.2 stack in one Python package."""

__version__ = "0.1.0"
