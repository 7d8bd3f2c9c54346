"""vqdiff: a VQ-VAE tokenizer and two generators over its token grids.

The library knows nothing of the CLI (`recipes`) or of the metrics (`evaluation`).
"""

__version__ = "0.1.0"
