"""tilecl: tiled, fused contrastive losses that never materialize the N x M similarity matrix."""

from ._backends import available_backends

__all__ = ["available_backends"]
__version__ = "0.1.0"
