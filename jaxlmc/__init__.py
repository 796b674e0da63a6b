"""jaxlmc: fine-tune many members of one pretrained model at once with jax.vmap, and measure whether they stay
in one loss basin (linear mode connectivity)."""

__version__ = "0.1.0"
