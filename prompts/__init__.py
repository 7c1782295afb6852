"""The prompt sets concept-erase writes itself (forget, surrogate, retain, class and style lists), one per line,
and the named evaluation sets in `sets/` (`--prompts minisd-digits`), all written by the project:

- `minisd-digits`: every MiniSD digit in every style (class and style columns), one row each;
- `imagenette`: the Imagenette concept presets' own wording, ten seeds per class (class column);
- `art-styles`: every subject of the style presets in every style, and without one (style column);
- `nudity`: the nudity preset's forget prompts (category "sexual") and clothed retain prompts ("none"), in the
  I2P layout, ten seeds each.
"""

from pathlib import Path

SETS_DIR = Path(__file__).resolve().parent / "sets"


def prompt_set_names() -> list[str]:
    return sorted(p.stem for p in SETS_DIR.glob("*.csv"))


def prompt_set_path(name: str) -> Path | None:
    """The shipped CSV of the set called `name`, or None when there is no such set."""
    path = SETS_DIR / f"{name}.csv"
    return path if name in prompt_set_names() else None
