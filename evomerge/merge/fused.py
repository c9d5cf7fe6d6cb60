"""Fused merge kernels: one pass per tensor, base and deltas read once, the merged tensor written once, in place.

``gta_kernel`` is the whole task-arithmetic family after sparsification (TIES trimming by threshold, sign
election, disjoint mean, lambda, + base) and ``linear_kernel`` the weighted average, written as elementwise
float32 maths with an explicit rounding to the run's dtype wherever mergekit's eager code rounds (every op of a
bfloat16/float16 tensor, every dim-0 sum once). Run eagerly (in chunks, so the temporaries stay a few chunk
sizes) they are bit-identical to ``methods.generalized_task_arithmetic`` / ``methods.linear``; compiled with
``torch.compile`` (inductor; ``emulate_precision_casts`` keeps those roundings, which inductor otherwise fuses
away) they are the same bits in one loop that writes straight into the live parameter. Tested both ways.

Numerics, as mergekit: weights are rounded to the run's dtype D, lambda to float32 (a Python scalar times a
D tensor computes in float32); the TIES sign is that of the float32 sum rounded to D, >= 0 is +; a dim-0 sum of
D tensors accumulates in float32 in model order and rounds once. Zero signs (+0 / -0) may differ where the
merged value is exactly zero; nothing else does.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

log = logging.getLogger(__name__)

F32 = torch.float32
CHUNK = 1 << 16  # eager path: elements per chunk (temporaries stay in cache and bounded)
# a float32 value rounds to a finite value of the dtype iff its magnitude is below this (the midpoint between the
# dtype's largest finite value and the next power, which rounds to even: to inf)
FINITE_BELOW = {torch.float32: float("inf"), torch.bfloat16: 3.3961775292304957e38, torch.float16: 65520.0}


def _r(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 values to `dtype` and back (what an eager op in `dtype` does to its float32 result)."""
    return x if dtype == F32 else x.to(dtype).to(F32)


def gta_kernel(out: torch.Tensor, base: torch.Tensor, xs: list[torch.Tensor], p: torch.Tensor,
               cut: torch.Tensor | None, ranks: list[torch.Tensor] | None, idx0: int, trim: bool, consensus: bool,
               normalize: bool, scaled: bool, work: torch.dtype) -> torch.Tensor:
    """Task arithmetic family over flat tensors, writing `out`; returns whether every value is finite.

    `xs[i]`: with `trim`, the delta (dtype D) trimmed by ``|x| < thr_i`` (and, with `cut`, the tied ones at flat
    index >= cut_i), or with `ranks` by ``rank_i >= cut_i`` (cut = k); without `trim`, the sparsified delta in
    the `work` dtype, times its rescale s_i.
    `p` (float32, 4n+2): weights (D-rounded) [0, n), thresholds [n, 2n), rescales [2n, 3n), lambda [3n],
    the divisor without consensus (D-rounded) [3n + 1]. `idx0`: flat index of element 0 (eager chunks).
    `scaled`: lambda != 1 (mergekit multiplies only then; a multiplication by 1 is exact, the flag saves a rounding).
    """
    dtype = base.dtype
    n = len(xs)
    wds = []
    for i, x in enumerate(xs):
        xf = x.to(F32)
        if trim and ranks is not None:
            assert cut is not None
            v = torch.where(ranks[i] >= cut[i], 0.0, xf)
        elif trim:
            a = xf.abs()
            drop = a < p[n + i]
            if cut is not None:
                idx = torch.arange(idx0, idx0 + x.numel(), device=x.device)
                drop = drop | ((a == p[n + i]) & (idx >= cut[i]))
            v = torch.where(drop, 0.0, xf)
        else:
            v = _r(_r(xf * p[2 * n + i], work), dtype)
        wds.append(_r(v * p[i], dtype))
    if consensus:
        total = wds[0]
        for wd in wds[1:]:
            total = total + wd
        # mergekit rounds this sum to D before taking its sign; a nonzero sum of D values is at least D's smallest
        # subnormal in magnitude, so the rounding never turns it into zero: the sign is that of the float32 sum
        pos = total >= 0
        mixed = div = None
        for i, wd in enumerate(wds):
            agree = torch.where(pos, wd > 0, wd < 0)
            m = torch.where(agree, wd, 0.0)
            d = torch.where(agree, p[i], 0.0)
            mixed = m if mixed is None else mixed + m
            div = d if div is None else div + d
        assert mixed is not None and div is not None
        mixed = _r(mixed, dtype)
        if normalize:
            div = _r(div, dtype)
            mixed = _r(mixed / torch.where(div == 0, 1.0, div), dtype)
    else:
        mixed = wds[0]
        for wd in wds[1:]:
            mixed = mixed + wd
        mixed = _r(mixed, dtype)
        if normalize:
            mixed = _r(mixed / p[3 * n + 1], dtype)
    if scaled:
        mixed = _r(mixed * p[3 * n], dtype)
    res = base.to(F32) + mixed
    out.copy_(res.to(dtype))
    return (res.abs() < FINITE_BELOW[dtype]).all()  # finite once rounded to D (NaN compares false)


def gta_eager(out: torch.Tensor, base: torch.Tensor, xs: list[torch.Tensor], p: torch.Tensor,
              cut: torch.Tensor | None, ranks: list[torch.Tensor] | None, idx0: int, trim: bool, consensus: bool,
              normalize: bool, scaled: bool, work: torch.dtype) -> torch.Tensor:
    """`gta_kernel` for eager execution on one chunk: the same values with in-place ops and float masks, which
    eager torch runs much faster than `torch.where` with scalars. Agreeing entries are summed as
    ``maj * sum(relu(maj * wd_i))`` in model order: exact, as multiplying by +-1 and negating a sum are."""
    dtype = base.dtype
    n = len(xs)
    pv = p.tolist()
    wds = []
    cuts = cut.tolist() if cut is not None and ranks is not None else None
    for i, x in enumerate(xs):
        if trim and ranks is not None and cuts is not None:
            drop = ranks[i] >= cuts[i]
            wd = x.to(F32).masked_fill(drop, 0) if x.dtype != F32 else x.masked_fill(drop, 0)
        elif trim:
            a = x.abs().to(F32)
            drop = a < pv[n + i]
            if cut is not None:
                idx = torch.arange(idx0, idx0 + x.numel(), device=x.device)
                drop |= (a == pv[n + i]) & (idx >= cut[i])
            wd = x.to(F32).masked_fill(drop, 0) if x.dtype != F32 else x.masked_fill(drop, 0)
        else:
            wd = x.to(F32) * pv[2 * n + i]
            if work != F32:
                wd = _r(wd, work)
        wd = _r(wd.mul_(pv[i]), dtype)
        wds.append(wd)
    mixed = wds[0].clone() if n == 1 else torch.add(wds[0], wds[1])
    for wd in wds[2:]:
        mixed.add_(wd)
    if consensus:
        maj = (mixed >= 0).to(F32).mul_(2).sub_(1)
        mixed.zero_()
        div = torch.zeros_like(mixed)
        for i, wd in enumerate(wds):
            r = wd.mul_(maj).clamp_min_(0)  # agreeing entries as |wd|, the rest 0
            mixed.add_(r)
            div.add_(r > 0, alpha=pv[i])
        mixed = _r(mixed.mul_(maj), dtype)
        if normalize:
            div = _r(div, dtype)
            mixed = _r(mixed.div_(div.add_(div == 0)), dtype)
    else:
        mixed = _r(mixed, dtype)
        if normalize:
            mixed = _r(mixed.div_(pv[3 * n + 1]), dtype)
    if scaled:
        mixed = _r(mixed.mul_(p[3 * n]), dtype)
    out.copy_(mixed.add_(base))
    return torch.isfinite(out).all()


def linear_kernel(out: torch.Tensor, xs: list[torch.Tensor], p: torch.Tensor, idx0: int,
                  normalize: bool) -> torch.Tensor:
    """mergekit's linear over flat tensors, compiled: ``result.addcmul_(x_i, w_i)`` in model order is a fused
    multiply-add in ATen's CPU kernels (AVX2/AVX-512) and on CUDA, hence inductor's fma here; / sum(w) (p[n]),
    rounded once to the output dtype. `p` (float32, n+1): weights, then the (zero-guarded) weight sum."""
    from torch._inductor import inductor_prims  # noqa: F401  (registers prims.fma)

    n = len(xs)
    acc = xs[0].to(F32) * p[0]
    for i in range(1, n):
        x = xs[i].to(F32)
        acc = torch.ops.prims.fma(x, p[i].expand_as(x), acc)
    if normalize:
        acc = acc / p[n]
    res = acc.to(out.dtype)
    out.copy_(res)
    return torch.isfinite(res).all()


def linear_eager(out: torch.Tensor, xs: list[torch.Tensor], p: torch.Tensor, idx0: int,
                 normalize: bool) -> torch.Tensor:
    """`linear_kernel` with ATen's own addcmul_ (so exactly mergekit's op, whatever this CPU's kernel does)."""
    n = len(xs)
    acc = torch.zeros(out.shape, dtype=F32, device=out.device)
    for i in range(n):
        acc.addcmul_(xs[i], p[i])
    if normalize:
        acc.div_(p[n])
    out.copy_(acc)
    return torch.isfinite(out).all()


Kernel = Callable[..., torch.Tensor]


class FusedKernels:
    """Runs the kernels compiled (one compile per variant: dtype, method flags, number of models; shapes are
    dynamic) or eagerly in chunks. A failing compile falls back to eager once, with a warning."""

    def __init__(self, mode: str = "compile"):
        if mode not in ("compile", "eager"):
            raise ValueError("mode must be 'compile' or 'eager'")
        self.mode = mode if compile_available() else "eager"
        self.compile_seconds = 0.0
        self._linear_fma: bool | None = None  # compiled linear (fma) checked against ATen's addcmul once
        self._seen: set[tuple] = set()
        self._flags: dict[torch.device, torch.Tensor] = {}

    def flags(self, numel: int, device: torch.device) -> torch.Tensor:
        """An all-False bool buffer of at least `numel` elements, reused; callers clear what they set."""
        buf = self._flags.get(device)
        if buf is None or buf.numel() < numel:
            buf = self._flags[device] = torch.zeros(numel, dtype=torch.bool, device=device)
        return buf

    def gta(self, out: torch.Tensor, base: torch.Tensor, xs: list[torch.Tensor], p: torch.Tensor,
            cut: torch.Tensor | None, ranks: list[torch.Tensor] | None = None, *, trim: bool, consensus: bool,
            normalize: bool, scaled: bool = True, work: torch.dtype) -> bool:
        """Merge into `out` (any shape; inputs of its numel, contiguous); True when every value is finite."""
        o, b, x = out.view(-1), base.reshape(-1), [t.reshape(-1) for t in xs]
        r = None if ranks is None else [t.reshape(-1) for t in ranks]
        if self.mode == "compile":
            ok = self._run_compiled("gta", o, b, x, p, cut, r, 0, trim=trim, consensus=consensus,
                                    normalize=normalize, scaled=scaled, work=work)
            if ok is not None:
                return ok
        finite = True
        for s in range(0, o.numel(), CHUNK):
            e = min(s + CHUNK, o.numel())
            finite &= bool(gta_eager(o[s:e], b[s:e], [t[s:e] for t in x], p, cut,
                                     None if r is None else [t[s:e] for t in r], s, trim, consensus, normalize,
                                     scaled, work))
        return finite

    def linear(self, out: torch.Tensor, xs: list[torch.Tensor], p: torch.Tensor, *, normalize: bool) -> bool:
        o, x = out.view(-1), [t.reshape(-1) for t in xs]
        if self.mode == "compile" and self._linear_fma is not False:
            ok = self._run_compiled("linear", o, x, p, 0, normalize=normalize)
            if ok is not None and self._linear_fma is None:  # first call: is this machine's addcmul an fma?
                check = torch.empty_like(o)
                self._eager_linear(check, x, p, normalize)
                self._linear_fma = torch.equal(check, o)
                if not self._linear_fma:
                    log.info("ATen's addcmul here is not a fused multiply-add: linear merges run eagerly")
                    o.copy_(check)
            if ok is not None:
                return ok
        return self._eager_linear(o, x, p, normalize)

    @staticmethod
    def _eager_linear(o: torch.Tensor, x: list[torch.Tensor], p: torch.Tensor, normalize: bool) -> bool:
        finite = True
        for s in range(0, o.numel(), CHUNK):
            e = min(s + CHUNK, o.numel())
            finite &= bool(linear_eager(o[s:e], [t[s:e] for t in x], p, s, normalize=normalize))
        return finite

    def _run_compiled(self, name: str, *args, **kwargs) -> bool | None:
        import time

        xs, cut, ranks = (args[2], args[4], args[5]) if name == "gta" else (args[1], None, None)
        key = (name, args[0].dtype, tuple(x.dtype for x in xs), cut is None, ranks is None,
               tuple(sorted(kwargs.items())))
        t0 = time.perf_counter()
        try:
            ok = bool(_compiled(name, key)(*args, **kwargs))
        except Exception as exc:  # no C++ compiler, an inductor bug...: eager is exact too, only slower
            log.warning("torch.compile of the fused merge kernel failed (%s: %s); merging eagerly",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.mode = "eager"
            return None
        if key not in self._seen:  # the first call of a variant compiles it (or loads it from inductor's cache)
            self._seen.add(key)
            self.compile_seconds += time.perf_counter() - t0
        return ok


_COMPILED: dict[tuple, Kernel] = {}


def _compiled(name: str, key: tuple) -> Kernel:
    """The compiled kernel of one variant (dtypes, models, flags), shared by every FusedKernels of the process.

    Each variant compiles a copy of the kernel with its own code object: dynamo caches (and limits recompiles,
    `recompile_limit`, 8 by default) per code object, and past the limit it would silently run the kernel
    eagerly on whole tensors, with whole-tensor temporaries."""
    if key not in _COMPILED:
        import types

        fn = {"gta": gta_kernel, "linear": linear_kernel}[name]
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_COMPILED)}")
        copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        _COMPILED[key] = torch.compile(copy, dynamic=True, options={"emulate_precision_casts": True})
    return _COMPILED[key]


def compile_available() -> bool:
    """torch.compile can be used: not disabled (EVOMERGE_NO_COMPILE=1 / TORCHDYNAMO_DISABLE=1), dynamo importable."""
    if os.environ.get("EVOMERGE_NO_COMPILE") == "1" or os.environ.get("TORCHDYNAMO_DISABLE") == "1":
        return False
    try:
        import torch._dynamo  # noqa: F401
    except Exception:
        return False
    return True
