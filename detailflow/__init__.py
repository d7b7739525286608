"""DetailFlow platform: train and serve 1D coarse-to-fine autoregressive image generators on Ray."""

__version__ = "0.1.0"
