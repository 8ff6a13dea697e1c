"""Training engines: `none` (one process), `deepspeed` (ZeRO 1/2/3), `fsdp2` (fully_shard per block)."""

from dmm.engines.base import Engine
from dmm.engines.single import SingleProcessEngine

_ENGINES = {"none": SingleProcessEngine}


def register_engine(name: str, cls) -> None:
    _ENGINES[name] = cls


def make_engine(name: str, recipe) -> Engine:
    if name == "none":
        return SingleProcessEngine()
    if name not in _ENGINES:
        try:  # distributed engines import their (heavy) libraries only when asked for
            __import__(f"dmm.engines.{name}")
        except ImportError as err:
            raise ValueError(f"engine {name!r} is not available here: {err}") from None
    if name not in _ENGINES:
        raise ValueError(f"unknown engine {name!r}; known: {sorted(_ENGINES)}")
    return _ENGINES[name](recipe)


__all__ = ["Engine", "SingleProcessEngine", "make_engine", "register_engine"]
