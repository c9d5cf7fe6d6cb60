"""Genome spaces: genome <-> candidate for parameter-space merges (`parameter`) and layer stacking
(`stacking`), behind the `GenomeSpace` / `Merger` protocols (`base`)."""

from evomerge.spaces.base import Candidate, GenomeSpace, Merger

__all__ = ["Candidate", "GenomeSpace", "Merger"]
