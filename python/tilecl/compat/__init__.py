"""Drop-in classes with the constructor and forward signatures of the libraries users already run,
computed by tilecl's tiled losses (``backend="auto"`` by default; every class takes ``backend=``).

- ``tilecl.compat.open_clip``: ``ClipLoss``, ``SigLipLoss`` (open_clip/loss.py); ``patch()``
  installs them into an imported open_clip (``create_loss`` and the classes)
- ``tilecl.compat.supcontrast``: ``SupConLoss`` (HobbitLong/SupContrast losses.py)
- ``tilecl.compat.pml``: ``SupConLoss``, ``NTXentLoss`` (pytorch-metric-learning call convention)
- ``tilecl.compat.sentence_transformers``: ``MultipleNegativesRankingLoss``,
  ``CachedMultipleNegativesRankingLoss`` (import it explicitly: not imported here, so that tilecl
  does not import sentence-transformers)
- ``tilecl.compat.transformers``: ``apply_to(model)`` computes the ``return_loss=True`` loss of a
  Hugging Face ``CLIPModel`` / ``SiglipModel`` with tilecl (import it explicitly, as above)

Re-exported here: ``ClipLoss``, ``SigLipLoss``, ``SupConLoss`` (SupContrast's), ``PMLSupConLoss``,
``PMLNTXentLoss``.
"""

from .open_clip import ClipLoss, SigLipLoss
from .pml import NTXentLoss as PMLNTXentLoss
from .pml import SupConLoss as PMLSupConLoss
from .supcontrast import DenseFallbackWarning, SupConLoss

__all__ = ["ClipLoss", "SigLipLoss", "SupConLoss", "PMLSupConLoss", "PMLNTXentLoss",
           "DenseFallbackWarning"]
