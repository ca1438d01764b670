"""Frozen vision foundation models as feature extractors: registry, wrapper, converters."""

from .backbone import FrozenVFM, MissingWeightsError, VFMSpec, build_vfm, level_indices
from .inhouse import (FAMILIES, INHOUSE_ARCHS, build_inhouse_arch, inhouse_path, load_inhouse,
                      save_inhouse)
from .registry import ENTRIES, VFMEntry, get_entry

__all__ = ["ENTRIES", "FAMILIES", "INHOUSE_ARCHS", "FrozenVFM", "MissingWeightsError", "VFMEntry", "VFMSpec",
           "build_inhouse_arch", "build_vfm", "get_entry", "inhouse_path", "level_indices", "load_inhouse",
           "save_inhouse"]
