"""Dense-Sparse-Dense training: per-tensor magnitude masks, phase recipes, and the paper's pipeline.

The public names load on first use (PEP 562), so `python -m dsd` can start without importing torch: a job
handed to the warm interpreter (dsd.prefork) never pays for it.
"""

from importlib import import_module

__all__ = ["DSD", "Phase", "Pruner", "Recipe", "magnitude_mask", "prunable_parameters"]
__version__ = "0.1.0"

_HOME = {
    "DSD": "dsd.core.driver",
    "Phase": "dsd.core.schedule",
    "Recipe": "dsd.core.schedule",
    "Pruner": "dsd.core.masks",
    "magnitude_mask": "dsd.core.masks",
    "prunable_parameters": "dsd.core.masks",
}


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dsd' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
