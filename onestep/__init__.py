"""onestep: train, evaluate and compare one-step generative models side by side."""

__version__ = "0.1.0"
