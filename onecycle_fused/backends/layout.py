"""How a tensor lies in memory, as the backends need to know it: its strides
(also while torch.compile traces), whether its elements fill one block of
memory, whether two tensors walk their elements in the same order, and
whether two tensors share part of their memory.

Python twins of ATen's ``is_non_overlapping_and_dense`` and
``get_overlap_status`` (ATen/MemoryOverlap.h), for the backends that build
their launches in Python (``triton``) or step tensor by tensor
(``reference``); the compiled ops call ATen's.
"""
from __future__ import annotations

from functools import partial
from itertools import chain
from operator import is_not

import torch

_data_ptr = torch.Tensor.data_ptr
_is_not_none = partial(is_not, None)


def strides(t: torch.Tensor):
    """``t.stride()``, in a form torch.compile can trace for any tensor.

    Under torch.compile a grad that is a view (``g.t()``, a permute) gets
    symbolic strides from its base, and dynamo (torch 2.13) fails on
    ``Tensor.stride()`` of such a tensor while tracing ("Cannot construct
    ConstantVariable ... SymInt"); the aten op returns the SymInts. Eager, the
    method: the op's dispatch costs microseconds."""
    if torch.compiler.is_compiling():
        return torch.ops.aten.stride.default(t)
    return t.stride()


def dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + numel)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, strides(t)) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same element order in memory (strides of size-1 dims do not matter)."""
    if a.shape != b.shape:
        return False
    return all(sa == sb for sa, sb, n in zip(strides(a), strides(b), a.shape) if n > 1)


def in_param_layout(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A copy of state ``t`` laid out as its parameter ``p`` when the two
    walk their elements in different orders (``t`` itself otherwise, and
    where ``p`` is not dense or the shapes or devices differ: the step's
    checks name those). A checkpoint saved from a contiguous model and
    loaded into a channels_last one, or ``model.to(memory_format=...)``
    after the state was made, gives such a state; the ``cuda`` op walks a
    parameter's states with the parameter's own offsets and refuses it.
    A state that is a view (of the parameter, of a flat buffer someone
    keeps) is left as it is: a copy would stop the updates reaching that
    memory, and one sharing its parameter's is refused (``check_states_unshared``,
    ``check_states_apart``).
    Eager only."""
    if type(t) is not torch.Tensor or p.layout != torch.strided or t.stride() == p.stride():  # (usual: ~0.3 us)
        return t
    if (t.shape != p.shape or t.device != p.device or same_layout(t, p)
            or not dense(p) or t._base is not None
            or t.untyped_storage()._cdata == p.untyped_storage()._cdata):
        return t
    return torch.empty_like(p, dtype=t.dtype).copy_(t)  # (preserve_format: a dense p's own strides)


def partially_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` share part of their memory: some elements of
    one are stored where other elements of the other are (the same elements
    in the same places, ``p.grad = p``, are not). ATen's rule
    (``get_overlap_status``), which torch.optim's in-place ops enforce: only
    tensors of one storage are compared, and only dense ones (others are
    "too hard" and pass), by their byte ranges; the same range with other
    strides (those of size-1 dims too) is a partial overlap. Eager only: it
    reads data pointers.

    What the backends do with it (as csrc/overlap.h): a grad that partially
    overlaps its parameter is read from a copy, as if read whole before the
    parameter is written (what torch.optim computes); a state that
    partially overlaps the parameter, the grad or another state is refused."""
    if a is b or a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage()._cdata != b.untyped_storage()._cdata or not (dense(a) and dense(b)):
        return False  # (_cdata: the StorageImpl's address, what ATen compares first)
    a_begin, b_begin = a.data_ptr(), b.data_ptr()
    a_end = a_begin + a.numel() * a.element_size()
    b_end = b_begin + b.numel() * b.element_size()
    if a_begin == b_begin and a_end == b_end:
        return tuple(strides(a)) != tuple(strides(b))
    return a_begin < b_end and b_begin < a_end


def internally_overlaps(t: torch.Tensor) -> bool:
    """True when several elements of ``t`` are one memory location: a
    dimension of more than one element with stride 0 (``expand()``). ATen's
    ``has_internal_overlap`` verdict "yes", which its in-place ops refuse
    ("more than one element of the written-to tensor refers to a single
    memory location"); other overlapping strides are "too hard" there and pass
    here too. A step would write such a parameter or state element by element,
    through a copy written back at the end: refused before anything is written."""
    if t.is_contiguous():
        return False
    return any(st == 0 and n > 1 for n, st in zip(t.shape, strides(t)))


def check_dense(params, where: str = "") -> None:
    """Refuse a parameter that is not dense (a strided view): ValueError, as
    the cuda op raises it, for a step over several devices to raise before
    any device is stepped. ``where`` starts the message."""
    for i, p in enumerate(params):
        if not dense(p):
            raise ValueError(
                f"{where}params[{i}] must be dense in memory (contiguous, or permuted like channels_last), got "
                f"sizes {list(p.shape)} strides {list(strides(p))}"
            )


# the state tensors of each algorithm, as StepBatch names their lists
STATE_LISTS = {"sgd": ("momentum_buffers",), "adam": ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")}
STATE_LISTS["adamw"] = STATE_LISTS["adam"]


def check_states_apart(i: int, param: torch.Tensor, grad: torch.Tensor, algo: str, states, where: str = "") -> None:
    """Refuse parameter ``i``'s states (``states``: tensors or None, in
    ``STATE_LISTS[algo]`` order) when one partially overlaps the parameter,
    the grad or another state, and the parameter or a state whose elements
    share memory (``internally_overlaps``): RuntimeError, as torch.optim's
    in-place ops raise, before anything is written. ``where`` starts the message."""
    named = [(name, t) for name, t in zip(STATE_LISTS[algo], states) if t is not None]
    for name, t in [("params", param)] + named:  # (the tensors a step writes)
        if internally_overlaps(t):
            raise RuntimeError(
                f"{where}{name}[{i}] has elements that share one memory location (a stride-0 dimension, as "
                f"expand() makes): the step writes every element, which torch.optim refuses too; give it memory "
                "of its own (clone() it)"
            )
    for j, (name, t) in enumerate(named):
        for other_name, other in [("params", param), ("grads", grad)] + named[:j]:
            if partially_overlap(other, t):
                raise RuntimeError(
                    f"{where}{other_name}[{i}] and {name}[{i}] partially overlap in memory (some elements of one "
                    "are stored where other elements of the other are): a state is written while the other is "
                    "read, as in torch.optim, which refuses it too; give the state memory of its own (clone() it)"
                )


def check_batch_states_apart(params, grads, algo: str, states, where: str = "") -> None:
    """``check_states_apart`` for every parameter of a step's lists
    (``states``: one list per ``STATE_LISTS[algo]`` entry)."""
    for i, (p, g) in enumerate(zip(params, grads)):
        check_states_apart(i, p, g, algo, [st[i] for st in states], where)


def check_states_unshared(params, algo: str, states, where: str = "") -> None:
    """Refuse a state tensor stored where a parameter or another state is
    (the same first element: one state given to two parameters, or a
    parameter's own memory, by hand): RuntimeError, before anything is
    written. Element by element such aliases read and write one location
    from several updates at once: the fused kernels' result depends on
    their order (on the CPU's threads, from run to run), where torch.optim's
    for-loop steps one tensor after the other. ``check_states_apart``
    refuses partial overlaps within a parameter's tensors; parameters may
    share memory among themselves (views of one buffer), as in torch.optim.
    Eager only: it reads data pointers (not meaningful on the meta device)."""
    if not params or params[0].device.type == "meta":
        return
    # the usual case in C-level passes (~0.1 us a tensor): no state's first
    # element where any other tensor's is; else the loop below finds which
    # (skipping empty tensors, whose pointers may coincide)
    present = list(filter(_is_not_none, chain.from_iterable(states)))
    state_ptrs = list(map(_data_ptr, present))
    if len(set(state_ptrs)) == len(state_ptrs) and set(map(_data_ptr, params)).isdisjoint(state_ptrs):
        return
    where_is = {p.data_ptr(): ("params", i, p) for i, p in enumerate(params) if p.numel()}
    for name, tensors in zip(STATE_LISTS[algo], states):
        for i, t in enumerate(tensors):
            if t is None or t.numel() == 0:
                continue
            other = where_is.setdefault(t.data_ptr(), (name, i, t))
            if other[:2] != (name, i) and not (other[1] == i and partially_overlap(other[2], t)):
                # (one of the same parameter laid out otherwise, a transposed
                # view: check_states_apart names that partial overlap)
                raise RuntimeError(
                    f"{where}{name}[{i}] is stored where {other[0]}[{other[1]}] is: each parameter's state needs "
                    "memory of its own (a state shared by two parameters, or a parameter's own memory, is written "
                    "by two updates at once); give it a copy (clone() it)"
                )
