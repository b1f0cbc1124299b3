"""Utilities whose import paths the user guide fixes (``lema.utils.model_utils``)."""
