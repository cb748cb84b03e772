"""The glyph dataset's class inventory: which letters are classes, and how they split.

Fonts (the DejaVu faces inside matplotlib), candidate letters, deduplication of look-alikes, the
domains' glyph lists and the seeded class -> split assignment; see :mod:`raydfml.data.glyphs` for the
rules and their reasons. Deterministic: no randomness here except the split permutation's seed.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import UserError
from .glyph_domains import DOMAINS, Domain
from .registry import SPLITS

DEFAULT_SPLIT = (64, 16, 20)

# DejaVu only: see the module docstring for why STIX is left out.
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
)
REFERENCE_FONT = "DejaVuSans.ttf"

# Look-alike test (see "Deduplication" above).
DEDUP_SIZE = 24               # side of the binarised, square-padded ink mask
DEDUP_TOLERANCE_PX = 1        # ink within this distance of the other glyph's ink counts as shared
DEDUP_THRESHOLD = 0.95        # both glyphs must share at least this fraction of their ink

_SPLIT_STREAM = 0             # rng stream of the split permutation (0 is no letter's code point)


def font_dir() -> Path:
    """The TTF folder inside the installed matplotlib (the fonts are part of its wheel)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_paths() -> list[Path]:
    paths = [font_dir() / f for f in FONT_FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"matplotlib's fonts are missing from {font_dir()}: {', '.join(missing)} "
                        f"(reinstall matplotlib)")
    return paths


@dataclass(frozen=True)
class Glyph:
    """One class: a letter, its script (first word of its Unicode name) and its folder name."""

    codepoint: int
    script: str

    @property
    def char(self) -> str:
        return chr(self.codepoint)

    @property
    def class_name(self) -> str:
        """Filesystem-safe, unique and sorted like the code points: ``u0041_latin_capital_letter_a``."""
        slug = re.sub(r"[^a-z0-9]+", "_", unicodedata.name(self.char).lower()).strip("_")
        return f"u{self.codepoint:04x}_{slug}"


def _script(codepoint: int) -> str:
    return unicodedata.name(chr(codepoint)).split()[0].lower()


def _is_plain_letter(codepoint: int) -> bool:
    """A letter that is its own NFKC and NFD form (no compatibility variant, no precomposed accent)."""
    ch = chr(codepoint)
    return (unicodedata.category(ch) in ("Lu", "Ll", "Lo")
            and unicodedata.normalize("NFKC", ch) == ch
            and unicodedata.normalize("NFD", ch) == ch)


def _covered_by_all_fonts(paths: Sequence[Path]) -> set[int]:
    from fontTools.ttLib import TTFont  # a matplotlib dependency

    covered: set[int] | None = None
    for path in paths:
        cmap = set(TTFont(str(path), lazy=True).getBestCmap())
        covered = cmap if covered is None else covered & cmap
    return covered or set()


def _render_ink(font: ImageFont.FreeTypeFont, ch: str) -> Image.Image:
    """The glyph drawn white on black, cropped to its ink (not to its advance box)."""
    left, top, right, bottom = font.getbbox(ch)
    pad = 2
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), ch, font=font, fill=255)
    box = canvas.getbbox()
    if box is None:
        raise RuntimeError(f"{font.path}: glyph U+{ord(ch):04X} has no ink")
    return canvas.crop(box)


def _ink_signature(font: ImageFont.FreeTypeFont, ch: str) -> tuple[np.ndarray, int]:
    """Square-padded, binarised ink mask (DEDUP_SIZE^2) and the number of 8-connected ink parts."""
    from scipy import ndimage  # installed with scikit-learn, a declared dependency

    ink = _render_ink(font, ch)
    parts = ndimage.label(np.asarray(ink) > 127, structure=np.ones((3, 3)))[1]
    w, h = ink.size
    side = max(w, h)
    square = Image.new("L", (side, side))
    square.paste(ink, ((side - w) // 2, (side - h) // 2))
    mask = np.asarray(square.resize((DEDUP_SIZE, DEDUP_SIZE), Image.Resampling.BOX)) > 127
    return mask, parts


def _dilate(masks: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of ``[..., H, W]`` masks by a disc (tiny radius: shifted ORs are enough)."""
    h, w = masks.shape[-2:]
    padded = np.pad(masks, [(0, 0)] * (masks.ndim - 2) + [(radius, radius), (radius, radius)])
    out = np.zeros_like(masks)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= padded[..., radius + dy:radius + dy + h, radius + dx:radius + dx + w]
    return out


def deduplicate(codepoints: Sequence[int], font: ImageFont.FreeTypeFont) -> list[int]:
    """Keep each code point (in the given order) unless it looks like one already kept.

    "Looks like": same number of ink parts, and each glyph has >= DEDUP_THRESHOLD of its ink within
    DEDUP_TOLERANCE_PX of the other's ink (a tolerant, symmetric overlap; see the module docstring).
    """
    signatures = [_ink_signature(font, chr(cp)) for cp in codepoints]
    masks = np.stack([m for m, _ in signatures]).reshape(len(codepoints), -1)
    grown = _dilate(masks.reshape(-1, DEDUP_SIZE, DEDUP_SIZE), DEDUP_TOLERANCE_PX).reshape(masks.shape)
    parts = np.array([p for _, p in signatures])
    area = np.maximum(masks.sum(1), 1)

    kept: list[int] = []
    for i in range(len(codepoints)):
        k = np.array(kept, dtype=int)
        if len(k):
            mine_covered = (masks[i] & grown[k]).sum(1) / area[i]
            theirs_covered = (masks[k] & grown[i]).sum(1) / area[k]
            same = (np.minimum(mine_covered, theirs_covered) >= DEDUP_THRESHOLD) & (parts[k] == parts[i])
            if same.any():
                continue
        kept.append(i)
    return [codepoints[i] for i in kept]


@lru_cache(maxsize=1)
def glyph_inventory() -> tuple[Glyph, ...]:
    """Every usable class, sorted by code point (about 0.5 s; cached per process)."""
    paths = font_paths()
    candidates = sorted(cp for cp in _covered_by_all_fonts(paths) if _is_plain_letter(cp))
    reference = ImageFont.truetype(str(font_dir() / REFERENCE_FONT), 96)
    return tuple(Glyph(cp, _script(cp)) for cp in deduplicate(candidates, reference))


def _domain(domain: str) -> Domain:
    if domain not in DOMAINS:
        raise UserError(f"--domain {domain!r}: unknown glyph domain; choose one of {', '.join(DOMAINS)}")
    return DOMAINS[domain]


def domain_glyphs(domain: str = "all") -> list[Glyph]:
    """The domain's classes, sorted by code point."""
    d = _domain(domain)
    return [g for g in glyph_inventory() if d.contains(g)]


def available_classes(domain: str = "all") -> int:
    """How many classes ``domain`` can offer: the most ``generate_glyphs(classes=...)`` accepts."""
    return len(domain_glyphs(domain))


def select_classes(glyphs: Sequence[Glyph], classes: int) -> list[Glyph]:
    """``classes`` glyphs evenly spaced over the sorted inventory (seed-independent, script-mixed)."""
    idx = np.linspace(0, len(glyphs) - 1, classes).round().astype(int)
    return [glyphs[i] for i in idx]


def default_split(classes: int) -> tuple[int, int, int]:
    """DEFAULT_SPLIT's proportions (64/16/20), rounded down for val and test: 100 -> (64, 16, 20)."""
    total = sum(DEFAULT_SPLIT)
    val = classes * DEFAULT_SPLIT[1] // total
    test = classes * DEFAULT_SPLIT[2] // total
    return classes - val - test, val, test


def assign_splits(glyphs: Sequence[Glyph], split: Sequence[int], seed: int) -> dict[str, list[Glyph]]:
    """Seeded permutation of the chosen classes, cut into (train, val, test); each part sorted."""
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(glyphs))
    bounds = np.cumsum([0, *split])
    return {name: sorted((glyphs[i] for i in order[lo:hi]), key=lambda g: g.codepoint)
            for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:])}
