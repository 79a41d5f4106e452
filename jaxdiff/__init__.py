"""jaxdiff: diffusion models in JAX/Flax, written as pure functions."""
__version__ = "0.1.0"
