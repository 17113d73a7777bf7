"""Readers for the public benchmarks in their published layouts, one module per layout.

Each returns a ``SourceLoad`` whose frame is in warehouse form (``entity, ts, sensors..., label``
with label null in the training range) for the bundled contract of the same name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tasks.loaders.common import SourceLoad
from tasks.loaders.nab import read_nab
from tasks.loaders.psm import read_psm
from tasks.loaders.skab import read_skab
from tasks.loaders.swat import read_swat
from tasks.loaders.telemanom import read_msl, read_smap
from tasks.loaders.ucr import read_ucr

LOADERS: dict[str, Callable[[Path], SourceLoad]] = {
    "nab": read_nab,
    "skab": read_skab,
    "ucr": read_ucr,
    "smap": read_smap,
    "msl": read_msl,
    "psm": read_psm,
    "swat": read_swat,
}

__all__ = ["LOADERS", "SourceLoad"]
