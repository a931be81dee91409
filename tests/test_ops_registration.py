"""The custom ops' registration: schemas, fake kernels (torch.library.opcheck),
argument checking, and a loader that never breaks the import."""
import logging

import pytest
import torch

from onecycle_fused import ops
from onecycle_fused.schedule import ROW_WIDTH, OneCycle, Row

pytestmark = pytest.mark.skipif(not ops.cpu_library_loaded(), reason="onecycle_fused._C is not built")


def _table(decoupled=False, amsgrad=False):
    row = OneCycle(0.01, 0.1, cycle_first_step_size=4).row() + [0.0] * (ROW_WIDTH - Row.MOMENTUM - 1)
    row[Row.WEIGHT_DECAY] = 0.01
    row[Row.BETA2] = 0.999
    row[Row.EPS] = 1e-8
    row[Row.AMSGRAD] = float(amsgrad)
    row[Row.DECOUPLED] = float(decoupled)
    row[Row.HAS_MOMENTUM_BUFFER] = 1.0
    return torch.tensor([row, row], dtype=torch.float64)


def _sgd_args(dtype=torch.float32, with_buffer=True):
    params = [torch.randn(5, dtype=dtype), torch.randn(2, 3, dtype=dtype)]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.zeros_like(p) if with_buffer else torch.empty(0) for p in params]
    steps = [torch.zeros((), dtype=torch.int64) for _ in params]
    return (params, grads, bufs, steps, [0, 1], _table(), torch.zeros((), dtype=torch.int64), None, None)


def _adam_args(dtype=torch.float32, amsgrad=True, scaler=False):
    params = [torch.randn(5, dtype=dtype), torch.randn(2, 3, dtype=dtype)]
    grads = [torch.randn_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    mx = [torch.zeros_like(p) if amsgrad else torch.empty(0) for p in params]
    steps = [torch.full((), 3, dtype=torch.int64) for _ in params]
    scale = torch.tensor(8.0) if scaler else None
    found = torch.tensor(0.0) if scaler else None
    return (params, grads, m, v, mx, steps, [1, 0], _table(True, amsgrad), torch.full((), 7, dtype=torch.int64),
            scale, found)


@pytest.mark.parametrize("with_buffer", [True, False])
def test_opcheck_sgd(with_buffer):
    torch.library.opcheck(torch.ops.onecycle_fused.sgd_step_.default, _sgd_args(with_buffer=with_buffer))


@pytest.mark.parametrize("amsgrad,scaler", [(True, False), (False, True)])
def test_opcheck_adam(amsgrad, scaler):
    torch.library.opcheck(torch.ops.onecycle_fused.adam_step_.default, _adam_args(amsgrad=amsgrad, scaler=scaler))


def test_opcheck_schedule_values():
    torch.library.opcheck(torch.ops.onecycle_fused.schedule_values.default, (_table(), 3))


def test_step_ops_advance_counters_once():
    args = _adam_args()
    torch.ops.onecycle_fused.adam_step_(*args)
    assert [int(s) for s in args[5]] == [4, 4] and int(args[8]) == 8


def test_found_inf_changes_nothing():
    args = list(_sgd_args())
    args[8] = torch.tensor(1.0)
    before = [t.clone() for t in args[0] + args[2] + args[3]] + [args[6].clone()]
    torch.ops.onecycle_fused.sgd_step_(*args)
    after = args[0] + args[2] + args[3] + [args[6]]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_bad_arguments_raise_value_errors_naming_them():
    sgd = torch.ops.onecycle_fused.sgd_step_
    args = list(_sgd_args())
    args[1] = [args[1][0], torch.randn(3, 2)]
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        sgd(*args)
    args = list(_sgd_args())
    args[4] = [0, 5]
    with pytest.raises(ValueError, match=r"group_ids\[1\]"):
        sgd(*args)
    args = list(_sgd_args())
    args[5] = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="table"):
        sgd(*args)
    args = list(_sgd_args())
    args[0] = [torch.zeros(5, dtype=torch.int32), args[0][1]]
    args[1] = [torch.zeros(5, dtype=torch.int32), args[1][1]]
    args[2] = [torch.empty(0), args[2][1]]
    with pytest.raises(ValueError, match=r"params\[0\]"):
        sgd(*args)
    args = list(_sgd_args())
    args[3] = [args[3][0], torch.zeros((), dtype=torch.int32)]
    with pytest.raises(ValueError, match=r"steps\[1\]"):
        sgd(*args)
    args = list(_adam_args())
    args[2] = args[2][:1]
    with pytest.raises(ValueError, match="exp_avgs"):
        torch.ops.onecycle_fused.adam_step_(*args)


def test_step_plan_class_and_op_registered():
    """StepPlan and step_planned_ (tests/test_step_plan.py runs them); the op
    is eager only, so it has no fake kernel and no opcheck here."""
    schema = str(torch.ops.onecycle_fused.step_planned_.default._schema)
    assert "__torch__.torch.classes.onecycle_fused.StepPlan plan" in schema and "Tensor(a!) counter" in schema
    assert schema.endswith("-> bool")
    plan = torch.classes.onecycle_fused.StepPlan("sgd", [], [], [], [], [], [], [], False)
    assert len(plan) == 0


def test_cpu_capability_reported():
    assert ops.cpu_capability() in ("DEFAULT", "AVX2", "AVX512", "AVX2/AVX512")


def test_missing_library_logs_once_and_does_not_raise(caplog):
    with caplog.at_level(logging.INFO, logger="onecycle_fused"):
        assert ops._load("_no_such_library") is False
        assert ops._load("_no_such_library") is False
    assert sum("_no_such_library" in r.getMessage() for r in caplog.records) == 1


def test_compiled_step_under_torch_compile():
    """The op traces through its fake kernel (no graph break, same result)."""
    args = _sgd_args()
    def copy(a):
        if isinstance(a, list):
            return [copy(x) for x in a]
        return a.clone() if isinstance(a, torch.Tensor) else a

    eager = copy(args)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(*a):
        torch.ops.onecycle_fused.sgd_step_(*a)

    step(*args)
    torch.ops.onecycle_fused.sgd_step_(*eager)
    for x, y in zip(args[0] + args[2] + args[3], eager[0] + eager[2] + eager[3]):
        assert torch.equal(x, y)
    assert torch.equal(args[6], eager[6])
