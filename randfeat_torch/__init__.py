"""randfeat_torch: random features vs gradient descent on targets where theory is sharp."""

__version__ = "0.1.0"
