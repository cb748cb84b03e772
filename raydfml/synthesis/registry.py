"""Per-teacher synthesizers by name (``synth.name``).

A synthesizer turns one teacher into labelled images: ``synthesize(teacher, classes, mean, std,
seed) -> Recovered``. Each is registered with a builder that takes the ``synth`` config section and
the working image size::

    @register_synthesizer("pixel")
    def build_pixel(sc, image_size):
        return PixelInversion(image_size=image_size, per_class=sc.per_class, steps=sc.steps, lr=sc.lr_pixel)

Methods with central synthesizer state (FREE's meta-generator, PURER's dataset) build theirs
themselves; this registry is for the stateless, per-teacher kind.
"""
from __future__ import annotations

from ..registry import Registry

SYNTHESIZERS = Registry("synthesizer", builtins=("raydfml.synthesis.pixel", "raydfml.synthesis.deepinv"))


def register_synthesizer(name: str):
    return SYNTHESIZERS.register(name)


def build_synthesizer(synth_cfg, image_size: int):
    """The synthesizer ``synth_cfg.name`` built from the ``synth`` section."""
    return SYNTHESIZERS.get(synth_cfg.name, option="config synth.name")(synth_cfg, image_size)


__all__ = ["SYNTHESIZERS", "build_synthesizer", "register_synthesizer"]
