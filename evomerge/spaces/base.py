"""The seam between the search and what it searches, as typed Protocols.

The search loop only ever sees genomes (vectors in [0,1]^dim) and fitness values; a `GenomeSpace`
turns a genome into a candidate (a mergekit recipe, or a layer stack with its recipe), and its
`Merger` turns a candidate into a live model to score. Implemented by `ParameterSpace`
(evomerge/spaces/parameter.py) and `StackSpace` (evomerge/spaces/stacking.py).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from evomerge.recipe import Recipe


class Candidate(Protocol):
    """What a genome stands for; exported as the YAML of a mergekit recipe."""

    def to_yaml(self) -> str: ...


@runtime_checkable
class Merger(Protocol):
    """Turns a candidate into the live model that gets scored (the very model its recipe materializes)."""

    def merge(self, candidate: Any) -> torch.nn.Module: ...


@runtime_checkable
class GenomeSpace(Protocol):
    """Genome <-> candidate, and what the search needs to know about it."""

    @property
    def dim(self) -> int: ...

    def decode(self, genome: np.ndarray) -> Any:
        """The candidate of a genome (a `Candidate`)."""

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The genome closest to a hand-written recipe (to start the search from it)."""

    def dedupe_key(self, genome: np.ndarray) -> str:
        """Equal for genomes that decode to the same candidate (evaluated once)."""

    def initial_genome(self) -> np.ndarray | None:
        """Where the search starts (None: the centre of the box)."""

    def layer_params(self, genome: np.ndarray) -> dict[str, list[float]]:
        """Row label -> per-layer values, for the report."""

    def gene_layout(self) -> Any:
        """A `GeneLayout`: the genes' names and real-unit ranges as the study shows them."""

    def baseline_genomes(self) -> list[tuple[str, np.ndarray]]:
        """(label, genome) of the uniform hand-made merges that are points of this space (for a warm start)."""

    def tokenizer_source(self) -> Any:
        """The weight source whose tokenizer the candidates use."""

    def make_merger(self, *, device: str, offload: str) -> Merger: ...
