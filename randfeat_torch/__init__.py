"""randfeat_torch: random features vs gradient descent on targets where theory is sharp."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_sweep", "run"]


def __getattr__(name: str) -> Any:
    """``randfeat_torch.run`` and ``randfeat_torch.load_sweep`` (:mod:`randfeat_torch.api`),
    imported on first use, so that ``import randfeat_torch`` stays light."""
    if name in __all__:
        from randfeat_torch import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
