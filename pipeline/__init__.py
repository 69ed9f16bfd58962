"""gan-pipeline: data-parallel MLP GAN training with Accelerate."""

__version__ = "0.1.0"
