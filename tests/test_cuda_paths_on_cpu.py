"""CUDA-only code paths of optim.py / backends, exercised on the CPU.

No GPU runs in CI, so the host-side logic of what only happens with CUDA
tensors is checked here with stand-ins: a CUDA graph capture is "host code
runs but ``_host_code_runs()`` says it does not" (what the optimizer asks), an
asynchronous counter copy is a pending value with an event that lands when
the test says so. The same behaviours on a real GPU: the ``gpu`` tests at the
end of tests/test_cuda_backend.py.
"""
import logging
import pickle

import pytest
import torch

from onecycle_fused import FusedOneCycleAdam, FusedOneCycleSGD, OneCycle
from onecycle_fused import backends as _backends

SCHED = dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=4, cycle_second_step_size=3,
             decay_step_size=2, decay_lr_rate=0.5)


def _sgd(backend="reference", **kw):
    p = torch.nn.Parameter(torch.zeros(5))
    opt = FusedOneCycleSGD([p], backend=backend, **SCHED, **kw)
    p.grad = torch.ones(5)
    return p, opt


def _lr(k):
    return OneCycle(**SCHED).lr(k)


class _Capturing:
    """While active, the optimizer believes a CUDA graph is being captured."""

    def __init__(self, opt):
        self.opt = opt

    def __enter__(self):
        self.opt._host_code_runs = lambda: False
        return self

    def __exit__(self, *exc):
        del self.opt._host_code_runs


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_mirror_after_steps_the_host_did_not_see(backend):
    """Steps run by a captured graph (or a compiled function) leave the host
    mirror stale; the next eager step re-reads the counter, which already
    counts that step: no +1 on top (the mirror used to run one step ahead for
    good after that)."""
    p, opt = _sgd(backend)
    opt.step()  # eager: state, table
    with _Capturing(opt):
        opt.step()
        opt.step()
    assert opt._host.stale
    opt.step()
    assert int(opt.step_counter()) == 4
    assert opt._host.step == 4
    assert opt.param_groups[0]["lr"] == _lr(4)
    opt.step()
    assert opt.get_last_lr() == [_lr(5)] == [opt.param_groups[0]["lr"]]


class _FakeEvent:
    def __init__(self):
        self.landed = False
        self.synchronized = False

    def query(self):
        return self.landed

    def synchronize(self):
        self.synchronized = True
        self.landed = True


def test_pending_copy_landing_steps_later():
    """The asynchronous copy of the counter (a CUDA GradScaler step) can land
    several steps later, the GPU running behind: the steps taken meanwhile
    still count (it used to fall back to the copy's value, steps behind)."""
    p, opt = _sgd()
    for _ in range(3):
        opt.step()
    event = _FakeEvent()
    # as _copy_counter_async leaves it after step 3: counter 3, host 3
    opt._host.pending = (opt.step_counter().clone(), event, opt._host.step)
    opt.step()
    opt.step()  # the copy has not landed: both steps counted optimistically
    assert opt._host.step == 5 and opt._host.pending is not None
    event.landed = True
    assert opt.get_last_lr() == [_lr(5)]
    assert opt._host.pending is None and opt._host.step == 5 == int(opt.step_counter())


def test_pending_copy_with_a_skipped_step_is_adopted():
    """A skipped step (found_inf on the GPU) is seen when the copy lands."""
    p, opt = _sgd()
    opt.step()
    opt._host.step += 1  # the optimistic count of a step GradScaler skipped: the counter stayed at 1
    event = _FakeEvent()
    opt._host.pending = (opt.step_counter().clone(), event, opt._host.step)
    opt.step()
    assert opt._host.step == 3
    event.landed = True
    assert opt.get_last_lr() == [_lr(2)]



@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_dcp_state_only_step_keeps_the_mirror_with_a_cuda_counter(backend):
    """torch.distributed.checkpoint's get_state_dict on a fresh optimizer runs
    a step that only makes the state (as one GradScaler skips). With a CUDA
    counter _advance_mirror counted it optimistically (the copy that would
    correct it lands later): the lr mirror showed step 1's lr, and the next
    step warned that a scheduler had written 'lr' (DCP puts back step 0's)."""
    import warnings

    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Linear(3, 2)
    opt = FusedOneCycleSGD(model.parameters(), backend=backend, **SCHED)

    class _CudaCounter:  # what _advance_mirror reads of a CUDA counter: its device
        device = torch.device("cuda")

    opt._mirror_counter = lambda: _CudaCounter()
    opt._copy_counter_async = lambda counter: None  # a copy that has not landed
    get_state_dict(model, opt)
    assert int(opt.step_counter()) == 0 and len(opt.state) == 2
    assert opt._host.step == 0 and opt.param_groups[0]["lr"] == _lr(0) == opt._lr_written.values[0]
    model(torch.randn(4, 3)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "'lr' was set from outside"
        opt.step()


def test_get_last_lr_waits_only_when_the_host_count_is_a_guess():
    p, opt = _sgd()
    opt.step()
    event = _FakeEvent()
    opt._host.pending = (opt.step_counter().clone(), event, opt._host.step)
    assert opt.get_last_lr() == [_lr(1)] and not event.synchronized  # not landed: the optimistic count
    # as after an eager step that followed captured ones: the host count is
    # a guess, the copy made from it the truth
    opt._host.step = 123
    opt._host.unknown = True
    opt._host.pending = (opt.step_counter().clone(), event, opt._host.step)
    assert opt.get_last_lr() == [_lr(1)] and event.synchronized
    assert not opt._host.unknown


def test_get_last_lr_during_capture_reads_nothing():
    """No event query and no counter read while capturing (both are illegal
    then): the mirror's values are returned as they are."""
    p, opt = _sgd()
    opt.step()

    class Untouchable:
        def query(self):
            raise AssertionError("event queried during capture")

        synchronize = query

    opt._host.pending = (opt.step_counter().clone(), Untouchable(), opt._host.step)
    with _Capturing(opt):
        opt.step()
        assert opt._host.stale
        assert opt.get_last_lr() == [_lr(1)]  # the mirror as the last eager step left it
    opt._host.pending = None
    assert opt.get_last_lr() == [_lr(2)]  # stale: re-read outside the capture


def test_get_last_lr_after_every_round_of_replays():
    """A captured graph replays at any time with no host code. The first
    get_last_lr() after the capture re-read the counter and cleared the
    stale flag, so after further replays it (and the 'lr' mirror) kept
    returning that first value: on a GPU, a loop logging get_last_lr()
    between replays logged the same lr forever."""
    p, opt = _sgd()
    opt.step()
    with _Capturing(opt):
        opt.step()  # the capture (the stand-in runs it: counts as the first replay)
    counter = opt.step_counter()
    assert opt.get_last_lr() == [_lr(2)]
    counter.add_(3)  # three replays: kernels only
    assert opt.get_last_lr() == [_lr(5)] == [opt.param_groups[0]["lr"]]
    counter.add_(1)
    opt.set_step(int(counter))  # a new position: the graph still replays from it
    counter.add_(2)
    assert opt.get_last_lr() == [_lr(8)]


def test_eager_steps_after_replays_after_a_read_adopt_the_counter():
    """Eager steps taken after replays that followed a get_last_lr() (the
    stale flag already cleared) counted +1 from the host's old value: the
    mirror stayed behind the counter by every later replay, for good. With a
    CUDA counter (stand-in: a CPU one the mirror takes for CUDA) each such
    step now copies the counter, adopted when the copy lands."""
    p, opt = _sgd()
    real = opt.step_counter()

    class _CudaCounter:
        device = torch.device("cuda")

        def __int__(self):
            return int(real)

    opt._mirror_counter = lambda: _CudaCounter()
    events = []

    def copy(counter):  # _copy_counter_async: a copy that lands when the test says so
        events.append(_FakeEvent())
        opt._host.pending = (real.clone(), events[-1], opt._host.step)

    opt._copy_counter_async = copy
    opt.step()
    with _Capturing(opt):
        opt.step()
    assert opt.get_last_lr() == [_lr(2)]
    real.add_(3)  # replays
    opt.step()  # 6 on the device; the host's guess is 3 until the copy lands
    events[-1].landed = True
    opt.step()
    assert int(real) == 7 == opt._host.step
    assert opt.param_groups[0]["lr"] == _lr(7)
    real.add_(2)  # replays, then get_last_lr: the counter itself
    assert opt.get_last_lr() == [_lr(9)]


@pytest.mark.parametrize("cls,kw", [(FusedOneCycleSGD, {}), (FusedOneCycleAdam, {})])
def test_state_creation_during_capture_raises_before_anything_changes(cls, kw):
    p = torch.nn.Parameter(torch.zeros(5))
    q = torch.nn.Parameter(torch.zeros(3))
    opt = cls([p, q], backend="reference", **SCHED, **kw)
    p.grad = torch.ones(5)
    opt.step()  # eager: p's state; q has no grad yet
    q.grad = torch.ones(3)
    before = p.detach().clone()
    with _Capturing(opt), pytest.raises(RuntimeError, match="create optimizer state.*run one step eagerly"):
        opt.step()
    assert len(opt.state[q]) == 0 and torch.equal(p, before) and int(opt.step_counter()) == 1


def test_first_step_inside_a_capture_raises():
    p, opt = _sgd()
    with _Capturing(opt), pytest.raises(RuntimeError, match="table.*run one step eagerly"):
        opt.step()
    assert len(opt.state) == 0 and int(opt.step_counter()) == 0


def test_hyper_parameter_changed_before_capture_raises():
    """The group table's upload cannot be captured (a host-to-device copy)."""
    p, opt = _sgd()
    opt.step()
    opt.param_groups[0]["weight_decay"] = 0.1
    with _Capturing(opt), pytest.raises(RuntimeError, match="hyper-parameter changed"):
        opt.step()
    assert int(opt.step_counter()) == 1
    opt.step()  # eagerly it is taken
    assert int(opt.step_counter()) == 2


def test_momentum_buffer_or_amsgrad_switched_on_before_capture_raises():
    p, opt = _sgd(cycle_momentum=False, momentum=0.0)
    opt.step()
    # the table changes too, so that check comes first; the state check is
    # for a table already refreshed (refresh, then capture)
    opt.param_groups[0]["momentum"] = 0.9
    opt._refresh_tables()
    with _Capturing(opt), pytest.raises(RuntimeError, match="momentum buffer"):
        opt.step()
    assert "momentum_buffer" not in opt.state[p]

    q = torch.nn.Parameter(torch.zeros(3))
    adam = FusedOneCycleAdam([q], backend="reference", **SCHED)
    q.grad = torch.ones(3)
    adam.step()
    adam.param_groups[0]["amsgrad"] = True
    adam._refresh_tables()
    with _Capturing(adam), pytest.raises(RuntimeError, match="max_exp_avg_sq"):
        adam.step()
    assert "max_exp_avg_sq" not in adam.state[q]


def test_unpickled_counters_are_keyed_by_their_device():
    """torch.load(map_location=...) of a whole pickled optimizer moves the
    counter tensors, not the keys of the dict that holds them: a GPU
    optimizer loaded onto the CPU had a 'cuda:0' key for a CPU counter."""
    p, opt = _sgd()
    opt.step()
    state = opt.__getstate__()
    counter = state["_onecycle_fused"]["counters"].pop(torch.device("cpu"))
    state["_onecycle_fused"]["counters"][torch.device("cuda", 0)] = counter  # as saved on a GPU, mapped to the CPU
    clone = FusedOneCycleSGD.__new__(FusedOneCycleSGD)
    clone.__setstate__(pickle.loads(pickle.dumps(state)))
    assert list(clone._counters) == [torch.device("cpu")]
    clone.step()
    assert int(clone.step_counter()) == 2


def test_step_counter_of_plain_cuda_means_the_current_device(monkeypatch):
    p, opt = _sgd()
    counter = opt.step_counter()
    opt._counters = {torch.device("cuda", 1): counter}  # stand-in: only the dict lookup is tested
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert opt._counter("cuda") is counter
    assert opt._counter(torch.device("cuda")) is counter
    assert opt._counter("cuda:1") is counter


def test_auto_falling_back_to_reference_on_a_gpu_warns_once(monkeypatch, caplog):
    """A GPU without _C_cuda and without a usable triton: 'auto' gives the
    per-tensor reference backend, with one warning saying why. float64
    parameters warn too (before, no fused GPU backend took them, and they
    were not warned about), and the warning is said once per device type."""
    dev = torch.device("cuda", 0)
    for name in ("cuda", "triton"):
        b = _backends.get_backend(name)
        if b is not None and b.available() and b.supports(dev, torch.float32):
            pytest.skip(f"the {name} backend serves CUDA tensors here")
    monkeypatch.setattr(_backends, "_WARNED_FALLBACK", set())
    with caplog.at_level(logging.WARNING, logger="onecycle_fused"):
        assert _backends.resolve("auto", dev, {torch.float64}).name == "reference"
        assert _backends.resolve("auto", dev, {torch.float64, torch.float32}).name == "reference"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "'reference'" in warnings[0] and "'cuda'" in warnings[0], warnings
    assert "torch.float64" in warnings[0] and "'triton'" in warnings[0], warnings


def test_a_backend_that_cannot_be_imported_is_logged_once(monkeypatch, caplog):
    """An optional backend's missing module (triton not installed) is said
    once per process, not on every available_backends() or auto resolve."""
    monkeypatch.setitem(_backends._REGISTRY, "missing", "onecycle_fused._no_such_module:Backend")
    monkeypatch.setattr(_backends, "_INSTANCES", dict(_backends._INSTANCES))
    with caplog.at_level(logging.INFO, logger="onecycle_fused"):
        for _ in range(3):
            assert "missing" not in _backends.available_backends()
            assert _backends.get_backend("missing") is None
    said = [r.getMessage() for r in caplog.records if "'missing'" in r.getMessage()]
    assert len(said) == 1 and "_no_such_module" in said[0], said
