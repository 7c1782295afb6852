"""concept-erase: erase concepts from Stable Diffusion with SalUn weight saliency (arXiv 2310.12508).

The library never imports gradio or nudenet at module level; `evaluation` and `app` build on it.
"""

__version__ = "0.1.0"

from .errors import ConceptEraseError

__all__ = ["ConceptEraseError", "__version__"]
