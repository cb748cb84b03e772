"""The glyph domains: subsets of the embedded glyph inventory by script (scenario md's datasets).

A leaf module: the dataset registry reads the domain names without importing the renderer.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Domain:
    """A subset of the inventory; ``scripts=None`` means every script."""

    name: str
    scripts: frozenset[str] | None
    description: str

    def contains(self, glyph) -> bool:
        """Whether a ``glyphs.Glyph`` (anything with a ``script``) belongs to this domain."""
        return self.scripts is None or glyph.script in self.scripts


DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("all", None, "every script, mixed (the default)"),
    Domain("latin", frozenset({"latin"}), "Latin, incl. IPA and extended letters"),
    Domain("greek", frozenset({"greek"}), "Greek (and Coptic block) letters not already Latin-like"),
    Domain("cyrillic", frozenset({"cyrillic"}), "Cyrillic letters not already Latin/Greek-like"),
    Domain("armenian", frozenset({"armenian"}), "Armenian letters"),
    Domain("georgian", frozenset({"georgian"}), "Georgian letters"),
)}

__all__ = ["DOMAINS", "Domain"]
