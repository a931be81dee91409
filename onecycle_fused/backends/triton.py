"""Triton backend: one kernel launch per (device, dtype) bucket per step.

The kernels live in ``triton_kernels.py``. This file builds their launch
tables (addresses, sizes, chunk offsets; layout described there), keeps them
on the device while the storages stay put, and exposes the step as the custom
op ``torch.ops.onecycle_fused_triton.step`` so that ``torch.compile`` traces
through it (mutated inputs declared, a fake kernel) and CUDA graphs capture
it.

Where it runs: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
(the interpreter, used by CI). Interpreted kernels read the addresses in the
launch table directly, so CUDA tensors are not served while interpreting.
Importing this module without triton raises ImportError: the registry logs it
and skips the backend.

Host cost per step: the cache key per bucket (every tensor's address,
layout, dtype and device: ``_C.launch_key``, a few tens of ns a tensor; a
narrower key in Python at ~2 us a tensor when ``_C`` did not load), then
the launches.
With ``_C``, a ``TritonPlan`` (step_plan.py) also spares later steps the
optimizer's Python loop over the parameters. A changed storage (new grads after
``zero_grad(set_to_none=True)`` landing elsewhere, a loaded checkpoint)
rebuilds that bucket's table: one small pinned, non-blocking copy, no sync
(while a CUDA graph is captured, a copy node of the graph: see ``_upload``).
"""
import collections
import contextlib
import dataclasses
import math
import operator
import weakref
from itertools import repeat
from typing import List, Optional

import torch
import triton  # noqa: F401  (ImportError here: the registry skips this backend)

from ..ops import c_function
from ..schedule import ROW_WIDTH
from . import StepBatch
from .layout import check_batch_states_apart, check_states_apart, dense, partially_overlap, same_layout
from . import triton_kernels as K

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_KERNELS = {"sgd": K.sgd_kernel, "adam": K.adam_kernel, "adamw": K.adam_kernel}
# launch tables kept per bucket: a few, so that grads alternating between two
# storages (caching allocator) do not rebuild every step
_CACHE_ENTRIES = 4

if ROW_WIDTH != 24:  # triton_kernels._ROW_WIDTH is a constexpr copy
    raise ImportError(f"triton_kernels expects ROW_WIDTH 24, schedule.py has {ROW_WIDTH}")


def interpreting() -> bool:
    """True when triton runs kernels in its interpreter (``TRITON_INTERPRET=1``
    was set before the kernels were created)."""
    return type(K.sgd_kernel).__name__ == "InterpretedFunction"


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Elements per block, blocks per program (a chunk is their product) and
    warps. Defaults until ``benchmarks/tune_triton.py`` has measured them on a
    GPU: 4 fp32 elements per thread per block, a 4096-element chunk."""

    block: int = 512
    iters: int = 8
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block", "iters", "num_warps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 1, got {v!r}")

    @property
    def chunk(self) -> int:
        return self.block * self.iters


def _capturing(device: torch.device) -> bool:
    """True while the current stream of ``device`` (CUDA) is being captured into a graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _uploaded(device: torch.device) -> bool:
    """True where a launch table is a device copy of its host image (CUDA);
    the interpreter's kernels read the host image itself."""
    return device.type == "cuda"


def _pinned_empty(numel: int) -> torch.Tensor:
    """Page-locked int64 host memory: the source of an asynchronous upload."""
    return torch.empty(numel, dtype=torch.int64, pin_memory=True)


def _stream_id(device: torch.device) -> int:
    """The current stream of a CUDA ``device``, as a number (cheaper than a
    ``torch.cuda.Stream`` object: this is read at every step)."""
    return torch._C._cuda_getCurrentRawStream(device.index)


def _record_stream(table: torch.Tensor, device: torch.device) -> None:
    """Tell the caching allocator that ``device``'s current stream uses ``table``."""
    table.record_stream(torch.cuda.current_stream(device))


_DATA_PTR = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel
_STRIDE = torch.Tensor.stride
_SIZE = torch.Tensor.size
_DTYPE = operator.attrgetter("dtype")
_IS_NEG = torch.Tensor.is_neg


def _compiled_launch_key():
    """csrc/launch_key.cpp's key function, None when ``_C`` did not load."""
    return c_function("launch_key")


_UNSET = object()
_launch_key = _UNSET  # resolved on first use, after ops.py has loaded the libraries


def _resolved_launch_key():
    global _launch_key
    if _launch_key is _UNSET:
        _launch_key = _compiled_launch_key()
    return _launch_key


def _ptrs(tensors) -> tuple:
    """Addresses of a list of tensors, 0 for None."""
    try:
        return tuple(map(_DATA_PTR, tensors))
    except TypeError:  # a None in the list
        return tuple(0 if t is None else t.data_ptr() for t in tensors)


def _layouts(tensors) -> tuple:
    """Strides, sizes, dtypes and negative bits of a list of tensors (None for None), for the cache key."""
    try:
        return (tuple(map(_STRIDE, tensors)), tuple(map(_SIZE, tensors)), tuple(map(_DTYPE, tensors)),
                tuple(map(_IS_NEG, tensors)))
    except (TypeError, AttributeError):  # a None in the list
        return tuple(None if t is None else (t.stride(), t.shape, t.dtype, t.is_neg()) for t in tensors)


class _LayoutError(ValueError):
    """A tensor the kernels cannot walk as it is (``conform`` makes one they can)."""


@dataclasses.dataclass
class _Launch:
    """A bucket's device-resident launch table and the views the kernel takes."""

    table: torch.Tensor  # int64: tensor records, chunk records, done slot
    chunks: torch.Tensor
    done: torch.Tensor
    n_tensors: int
    n_chunks: int
    aligned: bool
    # CUDA, built eagerly: pinned memory of the table's size that no copy has
    # read, for a table of the same size built while capturing (see _upload)
    spare: Optional[torch.Tensor] = None
    # CUDA, built while capturing: the pinned host image that the graph's
    # copy node reads at every replay (kept, never written again), and
    # whether an eager copy has filled the table yet (until a replay runs,
    # only the graph holds the copy)
    staged: Optional[torch.Tensor] = None
    written: bool = True
    # CUDA: the streams (_stream_id) whose kernels have read the table. The
    # caching allocator only knows the one it was allocated on: a table
    # evicted from the cache while a kernel on another stream still reads it
    # could otherwise be handed out again on the first one
    streams: set = dataclasses.field(default_factory=set)


class _Launcher:
    """Launch tables (cached) and kernel launches; shared by the op and the backend."""

    def __init__(self):
        # 16-bit types take 8 elements per thread for 16-byte accesses (see the PTX
        # check in tests/test_triton_gpu.py); all chunks hold 4096 elements
        # (float64: 4 per thread, two 16-byte accesses, as float32's default;
        # not tuned)
        half = LaunchConfig(block=1024, iters=4, num_warps=4)
        self.config = {torch.float32: LaunchConfig(), torch.bfloat16: half, torch.float16: half,
                       torch.float64: LaunchConfig()}
        self._cache: dict = {}
        # launches a captured CUDA graph uses: the graph holds raw addresses
        # of their tables, so these are never freed (the LRU above may drop
        # them, clear_cache too; the tables must outlive any replay)
        self._pinned: dict[int, _Launch] = {}

    def configure(self, dtype: torch.dtype, config: LaunchConfig) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
        if not isinstance(config, LaunchConfig):
            raise ValueError(f"config must be a LaunchConfig, got {config!r}")
        self.config[dtype] = config

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- launch tables ----------------------------------------------------
    def _build(self, algo, dtype, device, chunk, params, grads, states, steps, group_ids, capturing,
               donors=None) -> _Launch:
        """The launch table of a bucket. ``donors``: the bucket's cached launches
        (None for a table that is not cached: it gets no spare and takes none)."""
        n = len(params)
        records = []
        aligned = True
        for i in range(n):
            p, g = params[i], grads[i]
            what = f"parameter {i} of the {dtype} bucket"
            tensors = [p, g] + [s for s in (st[i] for st in states) if s is not None]
            # (layout.py; _run_eager checks what a _LayoutError leaves unchecked)
            check_states_apart(i, p, g, algo, [st[i] for st in states], where=f"the {dtype} bucket's ")
            if partially_overlap(p, g):
                raise _LayoutError(f"{what}: its grad partially overlaps it (read from a copy)")
            for t in tensors:
                if t.device != device or t.dtype != dtype:
                    raise ValueError(f"{what}: grad and states must be {dtype} on {device}, got {t.dtype} on {t.device}")
                if t.shape != p.shape:  # no copy can fix this one (conform fixes layouts)
                    raise ValueError(
                        f"{what}: grad and states must have the parameter's shape {tuple(p.shape)}, "
                        f"got {tuple(t.shape)}"
                    )
                if not same_layout(t, p):
                    raise _LayoutError(
                        f"{what}: grad and states must have the parameter's shape and memory layout, got "
                        f"strides {t.stride()} for {tuple(p.stride())}"
                    )
                if not dense(t):
                    raise _LayoutError(f"{what}: the triton backend needs dense (non-overlapping) tensors")
                if t.is_neg():  # (its elements are the negation of its memory)
                    raise _LayoutError(f"{what}: a tensor with its negative bit set is read from a copy")
                aligned = aligned and t.data_ptr() % 16 == 0
            s = steps[i]
            if s.dtype != torch.int64 or s.numel() != 1 or s.device != device:
                raise ValueError(f"{what}: its step must be an int64 scalar tensor on {device}")
            # an absent state points at the parameter: read under a false mask, never written
            addr = [p.data_ptr(), g.data_ptr()] + [p.data_ptr() if st[i] is None else st[i].data_ptr() for st in states]
            records.append(addr + [p.numel(), group_ids[i], s.data_ptr()])
        rec = torch.tensor(records, dtype=torch.int64).reshape(n, K.T_WIDTH)
        counts = torch.tensor([math.ceil(p.numel() / chunk) for p in params], dtype=torch.int64)
        n_chunks = int(counts.sum())
        owner = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts)
        first_chunk = torch.cumsum(counts, 0) - counts
        start = (torch.arange(n_chunks, dtype=torch.int64) - first_chunk[owner]) * chunk
        chunks = torch.stack([owner, start], 1)
        host = torch.cat([rec.flatten(), chunks.flatten(), torch.zeros(1, dtype=torch.int64)])
        table, spare, staged = self._upload(host, device, capturing, donors)
        c0 = n * K.T_WIDTH
        return _Launch(table, table[c0:], table[c0 + n_chunks * K.C_WIDTH:], n, n_chunks, aligned,
                       spare=spare, staged=staged, written=staged is None,
                       streams={_stream_id(device)} if _uploaded(device) else set())

    @staticmethod
    def _upload(host, device, capturing, donors):
        """(table, spare, staged) for the host image ``host`` of a new launch table.

        Eagerly: a non-blocking copy from pinned memory, plus a spare pinned
        buffer of the same size for later. While a CUDA graph is being
        captured the copy becomes a node of the graph, which reads its source
        again at every replay: that source must never change or be freed.
        It is a spare taken from a table used eagerly in this bucket (the
        warm-up step's, for the same parameters: same size), because
        allocating pinned memory inside a capture is not safe with every
        torch version (the host allocator polls CUDA events); a table whose
        spare was taken gets a new one at its next eager use. So grads that
        a captured backward allocates (``zero_grad(set_to_none=True)`` before
        the capture) get their table; each replay re-copies it (a few KiB
        plus 16 bytes per 4096-element chunk). ``staged`` must never be
        freed while a graph may replay (a freed pinned block is handed out
        again): ``_pinned`` keeps it for the life of the process."""
        n = host.numel()
        if not _uploaded(device):
            return host, None, None
        if not capturing:
            table = torch.empty(n, dtype=torch.int64, device=device)
            table.copy_(_pinned_empty(n).copy_(host), non_blocking=True)
            return table, None if donors is None else _pinned_empty(n), None
        donor = next((d for d in donors or () if d.spare is not None and d.spare.numel() == n), None)
        if donor is None:
            raise RuntimeError(
                "the triton backend needs a new launch table during CUDA graph capture and has no pinned "
                "buffer for it: run one optimizer step eagerly (warm-up) with the same parameters before "
                "the capture, and after any earlier capture. "
                "(Tensors the kernels must copy to walk, such as grads in another memory layout than "
                "their parameter, are not supported in a capture.)"
            )
        staged, donor.spare = donor.spare.copy_(host), None
        table = torch.empty(n, dtype=torch.int64, device=device)
        table.copy_(staged, non_blocking=True)
        return table, None, staged

    def _launch_table(self, algo, dtype, device, params, grads, states, steps, group_ids, cache=True) -> _Launch:
        chunk = self.config[dtype].chunk
        capturing = _capturing(device)
        if not cache:
            # tensors that live for one step (conform's copies): a table kept
            # under their addresses could later be hit by other tensors at the
            # same addresses without the layout check a build makes. (While
            # capturing, with no spare pinned buffer, the build refuses.)
            return self._build(algo, dtype, device, chunk, params, grads, states, steps, group_ids, capturing)
        # The key: every tensor's address; states are in it because a loaded
        # checkpoint replaces them while params and grads stay put. Strides
        # too: a grad can come back at the same address in another layout
        # (``p.grad = p.grad.t()``, an expanded grad), and a hit skips the
        # layout checks that ``_build`` makes. The states' strides and sizes
        # likewise: a state replaced at its address by a view of itself
        # (``state['exp_avg'].t()``, a slice) would be walked in the
        # parameter's order, or past its end; and their dtypes: a view in
        # another dtype (``exp_avg.view(torch.float16)`` of a bf16 state)
        # keeps all of that. And every tensor's negative bit: a neg view at
        # the address of a plain tensor (``torch._neg_view(g)``) must go
        # through conform's copy. ``_C.launch_key`` takes all of it, and the
        # devices, for every tensor in one C++ pass; the Python fallback
        # (~0.12 us an address with map over the unbound method, ~0.09 a
        # stride, ~0.18 the states' sizes and strides, ~0.05 a dtype or a
        # bit, and as much again to hash and compare the nested tuples) keeps
        # only what is listed above: the grads' dtypes and sizes are checked
        # by the optimizer before each list-path step, and there are no
        # step plans without _C.
        launch_key = _resolved_launch_key()
        tensors = launch_key(params, grads, *states, steps) if launch_key is not None else None
        if tensors is not None:
            key = (tensors, tuple(group_ids), chunk)
        else:
            key = (
                _ptrs(params), _ptrs(grads), _ptrs(states[0]), _ptrs(states[1]), _ptrs(states[2]), _ptrs(steps),
                tuple(map(_NUMEL, params)), tuple(map(_STRIDE, params)), tuple(map(_STRIDE, grads)),
                tuple(map(_IS_NEG, params)), tuple(map(_IS_NEG, grads)),
                _layouts(states[0]), _layouts(states[1]), _layouts(states[2]),
                tuple(group_ids), chunk,
            )
        bucket = self._cache.setdefault((algo, dtype, device), collections.OrderedDict())
        launch = bucket.get(key)
        if launch is None:
            launch = self._build(algo, dtype, device, chunk, params, grads, states, steps, group_ids, capturing,
                                 bucket.values())
            bucket[key] = launch
            while len(bucket) > _CACHE_ENTRIES:
                bucket.popitem(last=False)
        else:
            bucket.move_to_end(key)
            if not capturing and _uploaded(device):  # (captured: pinned below, never freed)
                stream = _stream_id(device)
                if stream not in launch.streams:
                    _record_stream(launch.table, device)
                    launch.streams.add(stream)
                if launch.spare is None:
                    # its spare went to a capture (or it was built in one):
                    # a new one, so that the next capture finds one too
                    launch.spare = _pinned_empty(launch.table.numel())
            if not launch.written:
                # built while capturing: filled only when that graph replays.
                # An eager step fills it now; another capture copies it too
                # (its graph may replay first)
                launch.table.copy_(launch.staged, non_blocking=True)
                launch.written = not capturing
        if capturing:
            self._pinned[id(launch)] = launch
        return launch

    # -- the step ---------------------------------------------------------
    def _prepare(self, algo, params, grads, states, steps, group_ids, table, counter, cache):
        """Checks, the dtype buckets and every bucket's launch table, before
        anything is launched: a bucket that raises must not leave others
        stepped. Returns [(dtype, lists, launch)]."""
        if algo not in _KERNELS:
            raise ValueError(f"algo must be one of {tuple(_KERNELS)}, got {algo!r}")
        device = counter.device
        if table.dtype != torch.float64 or table.dim() != 2 or table.shape[1] != ROW_WIDTH or not table.is_contiguous():
            raise ValueError(f"table must be a contiguous float64 [groups, {ROW_WIDTH}] tensor")
        dtypes = [p.dtype for p in params]
        kinds = set(dtypes)
        if not kinds.issubset(_DTYPES):
            raise ValueError(f"the triton backend supports {_DTYPES} parameters, got {sorted(map(str, kinds))}")
        if len(kinds) == 1:  # the common case: one bucket, the lists as given
            buckets = {dtypes[0]: (params, grads, list(states), steps, group_ids)}
        else:
            buckets = {}
            for dtype in kinds:
                idx = [i for i, d in enumerate(dtypes) if d == dtype]
                sel = lambda xs: [xs[i] for i in idx]  # noqa: E731
                buckets[dtype] = (sel(params), sel(grads), [sel(st) for st in states], sel(steps), sel(group_ids))
        return [(dtype, lists, self._launch_table(algo, dtype, device, *lists, cache))
                for dtype, lists in buckets.items()]

    @staticmethod
    def _guard(device):
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    def ready(self, algo, params, grads, states, steps, group_ids, table, counter) -> bool:
        """Whether ``run(..., quiet=True)`` would step: every launch table
        found or built (and cached), nothing launched."""
        with self._guard(counter.device):
            try:
                self._prepare(algo, params, grads, states, steps, group_ids, table, counter, True)
            except (ValueError, RuntimeError):
                return False
        return True

    def run(self, algo, params, grads, state1, state2, state3, steps, group_ids, table, counter, grad_scale, found_inf,
            cache=True, quiet=False) -> bool:
        """One step. ``quiet`` (a step plan's step): False, with nothing
        launched, instead of the error of tensors that fail a check or whose
        launch table cannot be built (the list path then raises it, or
        conforms the tensors)."""
        has_scale, has_inf = grad_scale is not None, found_inf is not None
        with self._guard(counter.device):
            try:
                prepared = self._prepare(algo, params, grads, (state1, state2, state3), steps, group_ids, table,
                                         counter, cache)
            except (ValueError, RuntimeError):
                if quiet:
                    return False
                raise
            if not prepared:
                K.advance_kernel[(1,)](counter, found_inf if has_inf else counter, HAS_INF=has_inf)
                return True
            kernel = _KERNELS[algo]
            last = len(prepared) - 1
            for b, (dtype, lists, launch) in enumerate(prepared):
                cfg = self.config[dtype]
                kernel[(max(launch.n_chunks, 1),)](
                    launch.table, launch.n_tensors, launch.chunks, launch.n_chunks, table, counter,
                    grad_scale if has_scale else counter, found_inf if has_inf else counter, launch.done, lists[0][0],
                    HAS_SCALE=has_scale, HAS_INF=has_inf, ADVANCE_COUNTER=b == last, ALIGNED=launch.aligned,
                    ROUND_BF16=dtype == torch.bfloat16 and interpreting(),
                    BLOCK=cfg.block, ITERS=cfg.iters, num_warps=cfg.num_warps, enable_fp_fusion=False,
                )
        return True


_launcher = _Launcher()


@torch.library.custom_op(
    "onecycle_fused_triton::step", mutates_args=("params", "state1", "state2", "state3", "steps", "counter")
)
def step_op(
    algo: str,
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    state1: List[torch.Tensor],
    state2: List[torch.Tensor],
    state3: List[torch.Tensor],
    present: List[int],
    steps: List[torch.Tensor],
    group_ids: List[int],
    table: torch.Tensor,
    counter: torch.Tensor,
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
) -> None:
    """One fused optimizer step on one device (see ``backends.Backend.step``).

    SGD: ``state1`` holds the momentum buffers. Adam/AdamW: exp_avg,
    exp_avg_sq, max_exp_avg_sq. The state lists hold only the states that
    exist; bit ``j`` of ``present[i]`` says whether parameter ``i`` has state
    ``j + 1``. (A mutated ``Tensor?[]`` holding None breaks torch.compile's
    functionalization in torch 2.13, hence no None here.)
    """
    # (traced, conform saw no addresses: a grad that partially overlaps its
    # parameter reaches this eager body as it is)
    _run_eager(algo, params, grads, unpack_states(present, state1, state2, state3),
               (steps, group_ids, table, counter, grad_scale, found_inf))


def _run_eager(algo, params, grads, states, rest) -> None:
    """One step through cached launch tables. Layouts are checked where a
    table is built, not every step (conform costs ~4.7 us a tensor on the
    host): only a step whose tensors the kernels cannot walk as they are
    goes through conform's copies. Nothing has been launched when the table
    build raises."""
    try:
        _launcher.run(algo, params, grads, *states, *rest)
        return
    except _LayoutError:
        # every parameter's originals, in every bucket: the build that raised
        # checked them only up to where it stopped, and conform's copies
        # would hide an overlap from the build that follows
        check_batch_states_apart(params, grads, algo, states)
        params, grads, states, writebacks = conform(params, grads, states)
    _launcher.run(algo, params, grads, *states, *rest, cache=False)
    for dst, src in writebacks:  # (a skipped step wrote nothing: this copies the same values back)
        dst.copy_(src)


@step_op.register_fake
def _step_fake(algo, params, grads, state1, state2, state3, present, steps, group_ids, table, counter, grad_scale,
               found_inf):
    return None  # everything happens in place


def _is_neg(t: torch.Tensor) -> bool:
    """``t.is_neg()``, False while torch.compile traces (dynamo cannot trace it:
    "torch.* op returned non-Tensor", which broke fullgraph=True); the op's
    eager body sees the real tensors and conforms a negative one itself
    (``_run_eager``)."""
    return not torch.compiler.is_compiling() and t.is_neg()


def conform(params, grads, states):
    """The kernels walk a tensor as ``numel`` elements from its data pointer, in
    its parameter's memory order: a dense parameter's grad and states must
    have its strides, and a parameter that is not dense (a strided view)
    cannot be walked at all. Tensors that do not fit are replaced by copies
    that do (a non-dense parameter and its states: contiguous ones); returns
    the lists to launch with and the (original, copy) pairs to write back
    after the launch. A tensor with its negative bit set (``torch._neg_view``,
    ``c.conj().imag``) stands for the negation of its memory, which the
    kernels would read as it is: it is copied too (``copy_`` and
    ``resolve_neg`` apply the negation). The usual layouts (states made by
    ``zeros_like(p)``, autograd's grads) copy nothing. A tensor of another shape than its
    parameter is left as it is, for the launch to refuse (ValueError, nothing
    written): a copy into the parameter's shape would broadcast it, step, and
    fail only when writing it back."""
    writebacks = []
    grads, states = list(grads), [list(st) for st in states]
    params_out = None
    for i, p in enumerate(params):
        if dense(p) and not _is_neg(p):
            def fits(t):
                return same_layout(t, p) and dense(t) and not _is_neg(t)

            def like_p(t):
                return torch.empty_strided(p.shape, p.stride(), dtype=t.dtype, device=t.device).copy_(t)
        else:
            if params_out is None:
                params_out = list(params)
            params_out[i] = p.resolve_neg().contiguous()
            writebacks.append((p, params_out[i]))

            def fits(t):
                return t.is_contiguous() and not _is_neg(t)

            def like_p(t):
                return t.resolve_neg().contiguous()
        g = grads[i]
        # a grad sharing part of its parameter's memory is read from a copy
        # too (layout.py), as if read whole first, as torch.optim reads it;
        # while tracing there are no addresses: step_op's body copies it
        if g.shape == p.shape and (not fits(g) or not torch.compiler.is_compiling() and partially_overlap(p, g)):
            grads[i] = like_p(g)  # read only
        for st in states:
            t = st[i]
            if t is not None and t.shape == p.shape and not fits(t):
                st[i] = like_p(t)
                writebacks.append((t, st[i]))
    return (params if params_out is None else params_out), grads, states, writebacks


def pack_states(*states):
    """Optional per-parameter state lists -> (present bitmasks, lists without None)."""
    present = [sum(1 << j for j, st in enumerate(states) if st[i] is not None) for i in range(len(states[0]))]
    return present, [[t for t in st if t is not None] for st in states]


def unpack_states(present, *packed):
    """Inverse of :func:`pack_states`."""
    out = []
    for j, lst in enumerate(packed):
        it = iter(lst)
        out.append([next(it) if mask >> j & 1 else None for mask in present])
    return out


_GRAD = operator.attrgetter("grad")


class TritonPlan:
    """A step plan (``onecycle_fused/step_plan.py``) for the triton backend:
    one device's lists but the grads, kept from a list-path step, so that
    later steps skip the optimizer's loop over parameters (~2 us a
    parameter). The Python twin of csrc/ops.cpp's ``StepPlan``, with the
    same rules: the grads are read from the parameters at each step; the
    state tensors are held weakly (offloading state by assignment frees the
    memory as before; a dead one is seen here, so a new tensor that took its
    id cannot pass for it); and any surprise returns False, with nothing
    launched, for the list path to raise its usual errors or build a new
    plan. A surprise here: a planned parameter without a grad, a watched one
    (no grad when the plan was built) with one, a dead state, or tensors for
    which no launch table can be built. The build checks each grad against
    its parameter (device, dtype, shape, layout) as the list path does,
    and a cached table is hit only by tensors at the addresses, and in the
    dtypes, devices, sizes and strides, it was built and checked for."""

    def __init__(self, algo, params, states, steps, group_ids, watched):
        self.algo = algo
        self.params = list(params)
        self.steps = list(steps)
        self.group_ids = list(group_ids)
        self.watched = list(watched)
        # per state list: None when no parameter has that state (SGD's two
        # unused lists, Adam without amsgrad), else weak references with None
        # where a parameter has none, and how many Nones that makes
        self.states = []
        for st in states:
            if all(t is None for t in st):
                self.states.append(None)
            else:
                refs = [None if t is None else weakref.ref(t) for t in st]
                self.states.append((refs, sum(map(operator.is_, refs, repeat(None)))))

    def __len__(self) -> int:
        return len(self.params)

    def _gather(self):
        """(grads, states) for a step, or None when the plan does not fit."""
        grads = list(map(_GRAD, self.params))
        if not all(map(operator.is_not, grads, repeat(None))):
            return None
        if self.watched and any(map(operator.is_not, map(_GRAD, self.watched), repeat(None))):
            return None
        n = len(self.params)
        states = []
        for entry in self.states:
            if entry is None:
                states.append([None] * n)
                continue
            refs, nones = entry
            st = [None if r is None else r() for r in refs]
            if sum(map(operator.is_, st, repeat(None))) != nones:  # a state died
                return None
            states.append(st)
        return grads, states

    # (torch.compiler.disable: a compiled optimizer.step() whose graph
    # breaks runs the optimizer's plan code eagerly, and dynamo would trace
    # every frame called from there, the interpreter's kernels included)
    @torch.compiler.disable
    def ready(self, table, counter) -> bool:
        """True when ``step`` would step: the grads and states are there and
        every launch table is found or built (nothing launched). With several
        devices every plan is asked first, so that one device is not stepped
        before another one's plan falls back to the list path, which raises."""
        gathered = self._gather()
        if gathered is None:
            return False
        grads, states = gathered
        return _launcher.ready(self.algo, self.params, grads, states, self.steps, self.group_ids, table, counter)

    @torch.compiler.disable
    def step(self, table, counter, grad_scale, found_inf) -> bool:
        gathered = self._gather()
        if gathered is None:
            return False
        grads, states = gathered
        return _launcher.run(self.algo, self.params, grads, *states, self.steps, self.group_ids, table, counter,
                             grad_scale, found_inf, quiet=True)


class TritonBackend:
    """``backend="triton"``: the kernels of ``triton_kernels.py``."""

    name = "triton"

    def available(self) -> bool:
        return interpreting() or torch.cuda.is_available()

    def supports(self, device, dtype) -> bool:
        device = torch.device(device)
        if dtype not in _DTYPES:
            return False
        return device.type == ("cpu" if interpreting() else "cuda")

    @staticmethod
    def configure(dtype: torch.dtype, block: int, iters: int, num_warps: int) -> None:
        """Set the launch configuration used for ``dtype`` parameters (process-wide)."""
        _launcher.configure(dtype, LaunchConfig(block, iters, num_warps))

    @staticmethod
    def launch_config(dtype: torch.dtype) -> LaunchConfig:
        return _launcher.config[dtype]

    @staticmethod
    def _states(batch: StepBatch):
        n = len(batch.params)
        if batch.algo == "sgd":
            return batch.momentum_buffers, [None] * n, [None] * n
        if batch.algo in ("adam", "adamw"):
            return batch.exp_avgs, batch.exp_avg_sqs, batch.max_exp_avg_sqs
        raise ValueError(f"batch.algo must be one of 'sgd', 'adam', 'adamw', got {batch.algo!r}")

    def make_plan(self, batch: StepBatch, watched: list) -> Optional[TritonPlan]:
        """A ``TritonPlan`` of ``batch``'s lists; ``watched``: the device's
        parameters that have no grad now. None without ``_C``: the key in
        Python leaves out the grads' dtypes and sizes, which the list path
        checks before each step."""
        if _resolved_launch_key() is None:
            return None
        return TritonPlan(batch.algo, batch.params, self._states(batch), batch.steps, batch.group_ids, watched)

    def step(self, batch: StepBatch) -> None:
        n = len(batch.params)
        states = self._states(batch)
        if any(len(s) != n for s in states) or len(batch.grads) != n or len(batch.steps) != n or len(batch.group_ids) != n:
            raise ValueError("batch lists (params, grads, steps, group_ids, states) must have equal lengths")
        rest = (batch.steps, list(batch.group_ids), batch.table, batch.counter, batch.grad_scale, batch.found_inf)
        if torch.compiler.is_compiling():
            params, grads, states, writebacks = conform(batch.params, batch.grads, states)
            present, packed = pack_states(*states)
            torch.ops.onecycle_fused_triton.step(batch.algo, params, grads, *packed, present, *rest)
            for dst, src in writebacks:
                dst.copy_(src)
        else:  # skips the dispatcher's per-call cost, same code underneath
            _run_eager(batch.algo, batch.params, batch.grads, states, rest)


__all__ = ["TritonBackend", "TritonPlan", "LaunchConfig", "interpreting", "step_op"]
