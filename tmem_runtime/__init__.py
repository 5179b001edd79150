"""tmem_runtime: a thin runtime that attaches fast weights to a transformers model and writes memory."""

from tmem_runtime.fast_weights import AdapterFileError, FastWeights, FastWeightsError, NonFiniteLossError
from tmem_runtime.models import DEFAULT_MODEL, ModelNotSupportedError, load_model
from tmem_runtime.recipes import RECIPES, Recipe

__all__ = [
    "DEFAULT_MODEL",
    "RECIPES",
    "AdapterFileError",
    "FastWeights",
    "FastWeightsError",
    "ModelNotSupportedError",
    "NonFiniteLossError",
    "Recipe",
    "load_model",
]
