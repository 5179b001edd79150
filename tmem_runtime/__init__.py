"""tmem_runtime: a thin runtime that attaches fast weights to a transformers model and writes memory.

    FastWeights   one session on a model (the simple API)
    SessionPool   many named sessions on one model: batched writes, a different memory per row
"""

from tmem_runtime.adapter_file import AdapterFileError
from tmem_runtime.engine import FastWeightsError
from tmem_runtime.fast_weights import FastWeights
from tmem_runtime.models import DEFAULT_MODEL, ModelNotSupportedError, load_model
from tmem_runtime.pool import SessionPool
from tmem_runtime.recipes import RECIPES, Recipe
from tmem_runtime.residency import PoolFullError, UnknownSessionError
from tmem_runtime.sessions import SessionStats, WriteError
from tmem_runtime.trainer import DivergedWriteError, NonFiniteLossError

__all__ = [
    "DEFAULT_MODEL",
    "RECIPES",
    "AdapterFileError",
    "DivergedWriteError",
    "FastWeights",
    "FastWeightsError",
    "ModelNotSupportedError",
    "NonFiniteLossError",
    "PoolFullError",
    "Recipe",
    "SessionPool",
    "SessionStats",
    "UnknownSessionError",
    "WriteError",
    "load_model",
]
