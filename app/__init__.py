"""The Gradio before/after app: `concept-erase app` or `python -m app`.

A thin layer over `concept_erase` and `evaluation` (docs/ARCHITECTURE.md): it generates with the library, detects with
`evaluation.nudity`, scores with `evaluation`, erases with the library's erase job (the Erase tab), and holds no
training or scoring logic of its own.
Importing this package is light; gradio is imported when the app is built.
"""

from .models import ModelRegistry
from .ui import AppConfig, build_app

__all__ = ["AppConfig", "ModelRegistry", "build_app"]
