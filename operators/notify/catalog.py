"""The catalog: every category and template, checked against each other when loaded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from operators.notify.categories import CatalogError, Category
from operators.notify.templates import Template


@dataclass(frozen=True, slots=True)
class Catalog:
    """Categories by name and templates by id; every template's category exists."""

    categories: Mapping[str, Category]
    templates: Mapping[str, Template]
    source: str = ""

    def __post_init__(self) -> None:
        for template in self.templates.values():
            if template.category not in self.categories:
                raise CatalogError(
                    f"template {template.template_id!r}: category {template.category!r} is not "
                    f"in the categories file ({', '.join(sorted(self.categories))})"
                )


def catalog_summary(catalog: Catalog) -> str:
    """One line for the start-up log."""
    tiers: dict[str, int] = {}
    for c in catalog.categories.values():
        tiers[c.tier] = tiers.get(c.tier, 0) + 1
    per_tier = ", ".join(f"{n} {t}" for t, n in sorted(tiers.items()))
    return f"{len(catalog.categories)} categories ({per_tier}), {len(catalog.templates)} templates"
