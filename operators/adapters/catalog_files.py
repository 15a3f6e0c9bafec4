"""Read the categories file and the templates directory, or the shipped defaults.

FANFARE_CATEGORIES_FILE and FANFARE_TEMPLATES_DIR name them; empty, the defaults in
`operators/notify/defaults/` are used.
"""

from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from operators.notify.catalog import Catalog
from operators.notify.categories import CatalogError, parse_categories
from operators.notify.templates import Template, parse_template


def defaults() -> Traversable:
    """The shipped categories file and templates directory."""
    return resources.files("operators.notify").joinpath("defaults")


def _read(path: Traversable | Path, what: str) -> str:
    try:
        return path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{what} {path}: cannot read it ({exc})") from None


def load_templates(directory: Traversable | Path) -> dict[str, Template]:
    """Every `*.toml` file of the directory, by file name (hidden files skipped)."""
    if not directory.is_dir():
        raise CatalogError(f"templates directory {directory}: not a directory")
    found: dict[str, Template] = {}
    for entry in sorted(directory.iterdir(), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.name.endswith(".toml"):
            continue
        template_id = entry.name.removesuffix(".toml")
        found[template_id] = parse_template(
            template_id, _read(entry, "template"), f"template {entry}"
        )
    if not found:
        raise CatalogError(f"templates directory {directory}: no *.toml template in it")
    return found


def load_catalog(categories_file: str = "", templates_dir: str = "") -> Catalog:
    """The catalog the settings name (empty: the shipped defaults); CatalogError if unusable."""
    shipped = defaults()
    categories_path: Traversable | Path = (
        Path(categories_file) if categories_file else shipped.joinpath("categories.toml")
    )
    templates_path: Traversable | Path = (
        Path(templates_dir) if templates_dir else shipped.joinpath("templates")
    )
    if isinstance(categories_path, Path) and not categories_path.is_file():
        raise CatalogError(f"categories file {categories_path}: no such file")
    categories = parse_categories(
        _read(categories_path, "categories file"), f"categories file {categories_path}"
    )
    return Catalog(categories, load_templates(templates_path), f"{categories_path}")
