"""tmem_runtime: a thin runtime that attaches fast weights to a transformers model and writes memory."""

from tmem_runtime.models import DEFAULT_MODEL, ModelNotSupportedError, load_model

__all__ = ["DEFAULT_MODEL", "ModelNotSupportedError", "load_model"]
