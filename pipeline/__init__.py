"""vitpipe: distributed training on Ray for efficient vision transformers."""

__version__ = "0.1.0"
