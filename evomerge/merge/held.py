"""What the resident merger holds for a run, loaded tensor by tensor in the layout a memory plan chose.

Per output tensor of the recipe's plan:
- task-arithmetic family: the base and one delta per model (``model - base`` in the run's dtype, exactly the
  value mergekit computes first), never the models themselves; TIES adds a ``GridThresholds`` per delta, DELLA
  its rank table, DARE/DELLA the deltas' L1 norms (floats);
- other methods (linear, slerp, ...): the sources;
- `embeddings: align`: every model's rows placed at the target's token ids first (the aligners `evomerge merge`
  uses), so deltas and sources are of aligned rows; `keep_target`: nothing (the live model holds the target's
  rows, written once).
Categories are the memory plan's item keys ("base", "deltas", "thresholds", "ranks", "tie cutoffs",
"sources"); those the plan puts on the host are kept there (pinned for CUDA) and streamed per candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from evomerge.merge.candidate import GTA_METHODS, HeldTensor, _l1, della_rank_table
from evomerge.merge.execute import Fetch, align_vocab
from evomerge.merge.plan import MergePlan, TensorPlan
from evomerge.merge.thresholds import GridThresholds

STEPS = 1000  # density grid (0.001), as evomerge.models.memory.DENSITY_STEPS and the search space's default


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class Holdings:
    """Loads and keeps the tensors of every output tensor of `plan`; `ties`: "exact", "index" or None (sort)."""

    def __init__(self, plan: MergePlan, fetch: Fetch, aligners: dict[str, Callable], *, device: torch.device,
                 ties: str | None, host: Collection[str] = (), steps: int = STEPS):
        self.plan = plan
        self.device = device
        self.host = set(host)
        self.method = plan.method
        self.gta = plan.method in GTA_METHODS
        self.ties = ties if GTA_METHODS.get(plan.method, (None,))[0] == "magnitude" else None
        self.tensors: dict[str, HeldTensor] = {}
        self.kept: dict[str, torch.Tensor] = {}  # keep_target rows, handed to the live model then dropped
        pin = device.type == "cuda"
        for tp in plan.tensors:
            if tp.vocab == "keep_target":
                self.kept[tp.out_name] = fetch(plan.target, tp.out_name)
                continue
            tensors = self._inputs(tp, fetch, aligners)
            if not self.gta:
                self.tensors[tp.out_name] = HeldTensor(sources=[self._place(t, "sources", pin) for t in tensors])
                continue
            assert tp.base_index is not None  # the task-arithmetic family needs a base; the plan checked it
            base = tensors[tp.base_index].to(device)
            held = HeldTensor(base=None, deltas=[])
            sparsification = GTA_METHODS[plan.method][0]
            for i, t in enumerate(tensors):
                if i == tp.base_index:
                    continue
                delta = t.to(device) - base
                assert held.deltas is not None
                if self.ties is not None:
                    where = torch.device("cpu") if "ranks" in self.host else device
                    table = GridThresholds(delta, steps=steps, ties=self.ties, device=where)
                    held.tables = (held.tables or []) + [table]
                if sparsification == "della_magprune":
                    held.della = (held.della or []) + [self._place(della_rank_table(delta), "ranks", pin)]
                if sparsification in ("random", "della_magprune"):
                    held.l1 = (held.l1 or []) + [_l1(delta)]
                held.deltas.append(self._place(delta, "deltas", pin))
                del delta
            if held.tables and len({t.dense for t in held.tables}) > 1:  # one layout per tensor: one kernel
                assert held.deltas is not None
                held.tables = [t if t.dense else GridThresholds(d, steps=steps, ties="exact", layout="ranks",
                                                                device=t.device)
                               for t, d in zip(held.tables, held.deltas)]
            held.base = self._place(base, "base", pin)
            self.tensors[tp.out_name] = held
            del tensors, base

    def _inputs(self, tp: TensorPlan, fetch: Fetch, aligners: dict[str, Callable]) -> list[torch.Tensor]:
        tensors = [fetch(inp.model, inp.name) for inp in tp.inputs]
        if tp.vocab == "align":
            tensors = align_vocab(self.plan, tp, tensors, fetch, aligners)
        return tensors

    def _place(self, t: torch.Tensor, category: str, pin: bool) -> torch.Tensor:
        if category in self.host:
            t = t.to("cpu")
            return t.pin_memory() if pin else t
        return t.to(self.device)

    def get(self, name: str) -> HeldTensor:
        """The held tensors of one output tensor, on the merge device (host-held ones are copied over)."""
        held = self.tensors[name]
        if not self.host:
            return held
        move = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        return HeldTensor(
            base=None if held.base is None else move(held.base),
            deltas=None if held.deltas is None else [move(d) for d in held.deltas],
            sources=None if held.sources is None else [move(s) for s in held.sources],
            tables=held.tables, della=None if held.della is None else [move(r) for r in held.della], l1=held.l1)

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held per memory-plan category (device and host together), zeros left out."""
        out = {"base": 0, "deltas": 0, "sources": 0, "thresholds": 0, "ranks": 0, "tie cutoffs": 0}
        for held in self.tensors.values():
            out["base"] += _nbytes(held.base)
            out["deltas"] += sum(_nbytes(t) for t in held.deltas or [])
            out["sources"] += sum(_nbytes(t) for t in held.sources or [])
            out["ranks"] += sum(_nbytes(t) for t in held.della or [])
            for table in held.tables or []:
                for key, value in table.nbytes().items():
                    out[key] += value
        return {k: v for k, v in out.items() if v}

    def tie_bytes(self, key: str) -> int:
        """Measured bytes of the TIES tie data: "ranks" (exact layout) or "tie cutoffs" (thresholds layout)."""
        return sum(t.nbytes()[key] for h in self.tensors.values() for t in h.tables or [])
