"""Shared pytest setup: make the in-tree ``jaxdiff`` package importable without installing it."""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
