"""Find recipe files and split them into valid and invalid, without raising."""

from __future__ import annotations

from pathlib import Path

from llmops_provider import config
from llmops_provider.recipes import RecipeError, load_recipe


def recipes_dir(default: Path) -> Path:
    configured = config.get("recipes_dir")
    return Path(configured).expanduser() if configured else default


def discover(directory: Path) -> tuple[list[Path], dict[Path, str]]:
    """Return (valid recipe paths, {invalid path: error message naming file, field and fix})."""
    valid: list[Path] = []
    invalid: dict[Path, str] = {}
    for path in sorted(directory.glob("*.y*ml")):
        try:
            load_recipe(path)
        except RecipeError as exc:
            invalid[path] = str(exc)
        else:
            valid.append(path)
    return valid, invalid
