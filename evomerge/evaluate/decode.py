"""Fast greedy decoding: a static KV cache, finished rows dropped on the CPU, a compiled decode step on CUDA.

`GenPlan` (generate.py) decodes each length-sorted, left-padded batch with `StaticDecoder.decode` when the model
can take it (`StaticDecoder.unsupported(model)` is None), else with its dynamic-cache loop. Both produce the same
tokens as transformers' `generate` (greedy, the same EOS ids): tested on CPU, token for token.

The KV cache is transformers' `StaticCache`, sized for the batch (prompt length + max_new_tokens) and filled in
place; the 2D attention mask covers the whole cache (the prompt's padding, ones for the generated slots: causality
hides the slots not written yet), and each decode step gets its 4D mask from `create_masks_for_generate`, as
`generate` builds it for a static cache. Two modes:

- eager (CPU; CUDA for a model's first call): rows that finish (EOS, stop string) are dropped from the batch and
  its cache at once (`Cache.reorder_cache` with the live rows), so a finished row costs nothing afterwards: on a
  CPU decoding is compute-bound and the longest answer of a batch no longer makes every row pay for it.
- graph (CUDA, `compile="auto"` from a model object's second call on; `compile="always"` anywhere): the decode
  step is the model's `get_compiled_call` (torch.compile, mode "reduce-overhead": CUDA graphs), the very compiled
  call `generate` uses with a static cache. Shapes stay fixed (no row dropping, finished rows decode pad); the
  batch's cache is kept across calls, so every candidate merged in place into the same live model replays the
  graphs recorded for the first (no recompilation, no re-recording). The host checks for finished rows and stop
  strings every `check_every` steps only (one synchronization per check). A model object seen once (a stacked
  candidate, built anew for every genome) is never compiled.

Compiled kernels may round differently from eager ones (inductor fuses), so on CUDA a compiled step can pick
another token where two logits tie to rounding; eager decoding is the reference (`compile="never"`).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Any, Callable, Literal

import torch

log = logging.getLogger(__name__)

CompileMode = Literal["auto", "always", "never"]
# cache layer classes whose state is only (keys, values, cumulative length): reset and row selection are exact
_STATIC_LAYERS = ("StaticLayer", "StaticSlidingWindowLayer")
# errors that mean "this model cannot take the static path" (the first batch falls back, the class is remembered)
FALLBACK_ERRORS = (TypeError, ValueError, AttributeError, IndexError, KeyError, NotImplementedError, RuntimeError)


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: `cache` (transformers >= 5.2x) or `past_key_values` (earlier)."""
    return "cache" if _accepts(getattr(model, "forward", model), "cache") else "past_key_values"


def _base_layers(model: torch.nn.Module) -> Any:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    return getattr(base, "layers", None)


class StaticDecoder:
    """Static-cache greedy decoding for one `GenPlan` (its batches' caches live here between calls)."""

    def __init__(self, *, compile: CompileMode = "auto", check_every: int = 4):
        self.compile = compile
        self.check_every = max(1, int(check_every))
        self._caches: dict[tuple, Any] = {}  # graph mode: (batch, rows, length, dtype, device) -> StaticCache
        self._last: weakref.ReferenceType | None = None  # the model object of the previous call
        self._calls = 0  # consecutive calls with that object
        self._broken: set[type] = set()  # model classes whose static path raised once
        self.graph_used = False  # whether the last `decode` ran the compiled step

    # ---- which path -------------------------------------------------------------------------------------
    def unsupported(self, model: torch.nn.Module) -> str | None:
        """None when `model` can decode here, else why not (the caller then uses the dynamic-cache loop)."""
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            return f"{type(model).__name__} is not a transformers PreTrainedModel"
        if type(model) in self._broken:
            return f"the static cache failed on {type(model).__name__} before"
        if not getattr(model, "_can_compile_fullgraph", False):
            return f"{type(model).__name__} does not declare static-cache support"
        config: Any = model.config
        if getattr(config, "is_encoder_decoder", False):
            return "encoder-decoder model"
        layers = _base_layers(model)
        n = getattr(config.get_text_config(decoder=True), "num_hidden_layers", None)
        if layers is None or n is None or len(layers) != n:
            return "the decoder layer list does not match config.num_hidden_layers"
        for i, layer in enumerate(layers):  # every layer writes its own cache slot (a stacked model's positions)
            idx = [m.layer_idx for m in layer.modules() if isinstance(vars(m).get("layer_idx"), int)]
            if idx and set(idx) != {i}:
                return f"decoder layer {i} indexes cache layer {sorted(set(idx))}"
        try:
            kinds = {type(layer).__name__ for layer in self._new_cache(model, 1).layers}
        except FALLBACK_ERRORS as exc:
            return f"no StaticCache for this config ({exc})"
        if not kinds <= set(_STATIC_LAYERS):
            return f"cache layers {sorted(kinds - set(_STATIC_LAYERS))} are not plain attention layers"
        return None

    def note_failure(self, model: torch.nn.Module, exc: BaseException) -> None:
        self._broken.add(type(model))
        log.warning("static-cache decoding failed for %s (%s: %s); using the dynamic-cache loop",
                    type(model).__name__, type(exc).__name__, exc)

    def _graph_mode(self, model: torch.nn.Module, device: torch.device) -> bool:
        if self.compile == "never" or not hasattr(model, "get_compiled_call"):
            return False
        if self.compile == "always":
            return True
        return device.type == "cuda" and self._calls >= 2  # auto: a model object from its second call on

    def begin(self, model: torch.nn.Module) -> None:
        """Count consecutive calls with the same model object (`GenPlan.run` calls this once per run)."""
        same = self._last is not None and self._last() is model
        self._calls = self._calls + 1 if same else 1
        if not same:
            self._caches.clear()  # another model: its graphs and caches would never be replayed
            self._last = weakref.ref(model)

    # ---- caches -----------------------------------------------------------------------------------------
    @staticmethod
    def _new_cache(model: torch.nn.Module, length: int) -> Any:
        from transformers import StaticCache

        config: Any = model.config
        return StaticCache(config=config.get_text_config(decoder=True), max_cache_len=length)

    def _cache(self, model: torch.nn.Module, key: tuple, length: int, keep: bool) -> Any:
        if not keep:
            return self._new_cache(model, length)
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = self._new_cache(model, length)
        else:
            cache.reset()  # zeros: stale keys/values from the previous candidate never meet a new mask
        return cache

    def cache_bytes(self) -> int:
        """Bytes of the KV caches kept between calls (graph mode)."""
        total = 0
        for cache in self._caches.values():
            for layer in cache.layers:
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
        return total

    # ---- decoding ---------------------------------------------------------------------------------------
    def decode(self, model: torch.nn.Module, batch: int, ids: torch.Tensor, mask: torch.Tensor, *,
               max_new_tokens: int, eos: torch.Tensor, pad_id: int,
               stopped: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, list[int]]:
        """Greedy tokens of one left-padded batch: ([rows, max_new_tokens] ids, pad after the end; tokens kept
        per row). `stopped(gen_rows, done_rows)` -> rows whose text so far holds a stop string (or done)."""
        args = (model, batch, ids, mask, max_new_tokens, eos, pad_id, stopped)
        self.graph_used = self._graph_mode(model, ids.device)
        if self.graph_used:
            try:
                with torch.no_grad():
                    return self._decode(*args, graph=True)
            except torch.OutOfMemoryError:
                raise
            except FALLBACK_ERRORS as exc:  # torch.compile / CUDA graphs unavailable: eager from now on
                log.warning("compiled decode step failed (%s: %s); decoding eagerly", type(exc).__name__, exc)
                self.compile, self.graph_used = "never", False
                self._caches.clear()
        with torch.inference_mode():
            return self._decode(*args, graph=False)

    def _decode(self, model, batch, ids, mask, n_new, eos, pad_id, stopped, *, graph: bool):
        from transformers.masking_utils import create_masks_for_generate

        rows, length = ids.shape
        device = ids.device
        key = (batch, rows, length + n_new, model.dtype, str(device))
        cache = self._cache(model, key, length + n_new, keep=graph)
        ckw = cache_kwarg(model)
        make_mask = getattr(model, "create_masks_for_generate", create_masks_for_generate)
        mkw = "cache" if _accepts(make_mask, "cache") else "past_key_values"
        full = torch.cat([mask, torch.ones((rows, n_new), dtype=mask.dtype, device=device)], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=full, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **{ckw: cache})
        nxt = out.logits[:, -1].argmax(-1)
        del out
        step_fn = model.get_compiled_call(_compile_config()) if graph else model
        gen = torch.full((rows, n_new), pad_id, dtype=torch.long, device=device)
        lens = torch.full((rows,), n_new, dtype=torch.long, device=device)  # generated tokens kept per row
        live = torch.arange(rows, device=device)  # batch row of each row still decoding (eager drops rows)
        done = torch.zeros(rows, dtype=torch.bool, device=device)  # of the live rows
        last = pos[:, -1:]
        empty = torch.empty((rows, 1, 0), dtype=model.dtype, device=device)
        steps = 0
        for step in range(n_new):
            is_eos = torch.isin(nxt, eos)
            lens[live] = torch.where(is_eos & ~done, step, lens[live])  # the EOS token is not part of the text
            gen[live, step] = torch.where(done | is_eos, pad_id, nxt)
            done = done | is_eos
            steps = step + 1
            check = not graph or steps % self.check_every == 0
            if stopped is not None and steps % self.check_every == 0:
                new = stopped(gen[live, :steps], done)
                lens[live] = torch.where(new & ~done, steps, lens[live])
                done = new
            if steps == n_new or (check and bool(done.all())):
                break
            if not graph and bool(done.any()):  # drop finished rows from the batch and its cache
                keep = (~done).nonzero().flatten()
                cache.reorder_cache(keep)
                live, full, last, nxt, done = live[keep], full[keep], last[keep], nxt[keep], done[keep]
                empty = empty[keep]
            last = last + 1
            tok = nxt[:, None]
            attn = make_mask(config=model.config, inputs_embeds=empty, attention_mask=full, position_ids=last,
                             **{mkw: cache})
            if graph:
                torch.compiler.cudagraph_mark_step_begin()
            logits = step_fn(input_ids=tok, attention_mask=attn, position_ids=last, use_cache=True,
                             **{ckw: cache}).logits
            nxt = logits[:, -1].argmax(-1)
            del logits
        return gen, lens.clamp(max=steps).tolist()


def _compile_config() -> Any:
    from transformers import CompileConfig

    return CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
