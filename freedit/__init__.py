"""freedit: FREE speculative sampling for Diffusion Transformers."""
__version__ = "0.1.0"
