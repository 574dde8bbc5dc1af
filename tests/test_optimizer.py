"""AveragedOptimizer / wrap(): a torch.optim.Optimizer that behaves exactly like the one it wraps."""

import copy
import types
import warnings

import pytest
import torch
from helpers import same_state

import fastavg
from fastavg import EMA, LAWA, SWA


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).to(dtype)


def _batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    return torch.randn(5, 6, generator=g).to(dtype)


def _pair(make_opt, averaging="ema", **kw):
    """Two identical models: one with the plain optimizer, one wrapped."""
    plain_model = _model()
    wrapped_model = copy.deepcopy(plain_model)
    plain = make_opt(plain_model)
    wrapped = fastavg.wrap(make_opt(wrapped_model), averaging, **kw)
    return (plain_model, plain), (wrapped_model, wrapped)


def _same_params(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_is_an_optimizer_sharing_the_inner_objects(backend):
    inner = torch.optim.AdamW(_model().parameters(), lr=0.1)
    opt = fastavg.wrap(inner, "ema", backend=backend)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, fastavg.AveragedOptimizer)
    assert opt.optimizer is inner and opt.param_groups is inner.param_groups
    assert opt.state is inner.state and opt.defaults is inner.defaults
    inner.load_state_dict(inner.state_dict())  # rebinds inner.state / param_groups
    assert opt.state is inner.state and opt.param_groups is inner.param_groups
    assert isinstance(opt.averager, fastavg.Averager)
    assert opt.names == ["ema"] and opt.step_count == 0 and "AdamW" in repr(opt)


def test_wrap_argument_errors():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        fastavg.wrap(object())
    opt = fastavg.wrap(torch.optim.SGD(_model().parameters(), lr=0.1))
    with pytest.raises(TypeError, match="already"):
        fastavg.wrap(opt)
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(ValueError, match="unknown averaging"):
        fastavg.wrap(torch.optim.SGD(_model().parameters(), lr=0.1), "lookahead")
    with pytest.raises(TypeError):
        fastavg.wrap(torch.optim.SGD(_model().parameters(), lr=0.1), EMA(), decay=0.5)
    wrapped = fastavg.wrap(torch.optim.SGD(_model().parameters(), lr=0.1), "lawa", window=5, every=200)
    assert wrapped.averager.specs == {"lawa": LAWA(window=5, every=200)}


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.01),
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, fused=True),
        lambda m: torch.optim.Adam(m.parameters(), lr=0.01, foreach=False),
    ],
    ids=["sgd", "adamw", "adamw-fused", "adam-loop"],
)
def test_same_trajectory_with_scheduler_and_clipping(make_opt, backend):
    (pm, po), (wm, wo) = _pair(make_opt, {"ema": EMA(0.9), "lawa": LAWA(2, every=3)}, backend=backend)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=30) for o in (po, wo)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for step in range(30):
            for model, opt, sched in ((pm, po, schedulers[0]), (wm, wo, schedulers[1])):
                model(_batch(step)).square().mean().backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
                opt.step()
                opt.zero_grad()
                sched.step()
    assert _same_params(pm, wm)
    assert po.param_groups[0]["lr"] == wo.param_groups[0]["lr"]
    assert wo.step_count == 30 and wo.num_averaged("lawa") == 2


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_matches_inner_optimizer_and_skipped_steps_do_not_count(fused):
    (pm, po), (wm, wo) = _pair(lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, fused=fused), SWA())
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)]
    for step in range(12):
        for model, opt, scaler in ((pm, po, scalers[0]), (wm, wo, scalers[1])):
            loss = model(_batch(step)).square().mean()
            scaler.scale(loss).backward()
            if step in (3, 7):
                next(model.parameters()).grad[0, 0] = float("inf")  # this step must be skipped
            if step == 5:
                scaler.unscale_(opt)  # unscale then clip, as in the AMP recipe
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert _same_params(pm, wm)
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**8
    assert wo.step_count == 10 and wo.num_averaged() == 10
    assert not hasattr(wo.optimizer, "grad_scale") and not hasattr(wo.optimizer, "found_inf")


def test_a_cuda_graph_capture_is_refused_by_step_before_the_inner_step_and_by_averaged(monkeypatch, backend):
    # A captured step would replay this step's update (its weights, its LAWA slot) and count
    # nothing; a captured averaged() would keep what it swapped in at capture. Without a GPU:
    # parameters taken for CUDA ones and a capture said to be running (test_cuda.py captures).
    model = _model()
    opt = fastavg.wrap(torch.optim.SGD(model.parameters(), lr=0.1), LAWA(window=2, every=1), backend=backend)
    avg = fastavg.Averager(list(model.parameters()), EMA(0.5), backend=backend)
    model(_batch(0)).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    for averager in (opt.averager, avg):
        monkeypatch.setattr(averager, "_on_cuda", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for step in (opt.step, avg.step):
        with pytest.raises(RuntimeError, match=r"CUDA graph is being captured.*opt.averager.step\(\)"):
            step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the inner step did not run
    assert opt.step_count == avg.step_count == 0 and opt.num_averaged() == 0
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    opt.step()
    avg.step()
    assert opt.step_count == avg.step_count == 1 and opt.num_averaged() == 1
    # What averaged() swaps in, and averaged_params()'s values, are decided on the host too.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    training = [p.detach().clone() for p in model.parameters()]
    for averager in (opt, avg):
        with pytest.raises(RuntimeError, match=r"averaged\(\) while a CUDA graph .*replay it inside averaged"):
            with averager.averaged():
                pass
        with pytest.raises(RuntimeError, match=r"averaged_params\(\) while a CUDA graph"):
            averager.averaged_params()
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), training))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for averager in (opt, avg):  # nothing was left open
        with averager.averaged():
            pass
        averager.step()
    assert opt.step_count == avg.step_count == 2


def test_a_cuda_graph_capture_is_refused_by_load_state_dict_and_reset_before_anything_changes(monkeypatch, backend):
    # Captured copies and fills would run only on a replay, while t and the counts would change at
    # once: the averages would keep their values under the loaded (or reset) schedule.
    model = _model()
    opt = fastavg.wrap(torch.optim.AdamW(model.parameters(), lr=0.1), LAWA(window=2, every=1), backend=backend)
    avg = fastavg.Averager(list(model.parameters()), EMA(0.5), backend=backend)
    for i in range(3):
        model(_batch(i)).square().mean().backward()
        opt.step()
        avg.step()
        opt.zero_grad()
    saved_opt, saved_avg = copy.deepcopy(opt.state_dict()), copy.deepcopy(avg.state_dict())
    model(_batch(3)).square().mean().backward()
    opt.step()
    avg.step()
    before_opt, before_avg = copy.deepcopy(opt.state_dict()), copy.deepcopy(avg.state_dict())
    for averager in (opt.averager, avg):
        monkeypatch.setattr(averager, "_on_cuda", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    calls = [
        (lambda: opt.load_state_dict(saved_opt), "load_state_dict"),
        (lambda: opt.load_state_dict({k: v for k, v in saved_opt.items() if k != "fastavg"}), "load_state_dict"),
        (lambda: avg.load_state_dict(saved_avg), "load_state_dict"),
        (lambda: opt.averager.load_state_dict(saved_opt["fastavg"]), "load_state_dict"),
        (opt.averager.reset, "reset"),
        (avg.reset, "reset"),
    ]
    for call, name in calls:
        with pytest.raises(
            RuntimeError, match=rf"{name}\(\) while a CUDA graph is being captured.*outside the capture"
        ):
            call()
    # Nothing moved: not the inner optimizer's state, not t, not an average.
    assert same_state(opt.state_dict(), before_opt) and same_state(avg.state_dict(), before_avg)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    opt.load_state_dict(saved_opt)
    avg.load_state_dict(saved_avg)
    assert opt.step_count == avg.step_count == 3
    avg.reset()
    assert avg.step_count == 0


def test_closure_loss_is_returned():
    model = _model()
    opt = fastavg.wrap(torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3), "ema")

    def closure():
        opt.zero_grad()
        loss = model(_batch(0)).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and opt.step_count == 1
    sgd = fastavg.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    assert sgd.step() is None


def test_zero_grad_forwards_set_to_none():
    model = _model()
    opt = fastavg.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    model(_batch(0)).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_step_hooks_registered_on_the_wrapper_run():
    model = _model()
    opt = fastavg.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.step()
    assert calls == ["pre", "post"]


def _hook_log(step_function):
    """Every step hook call of one opt.step(closure) whose class step is ``step_function``: the
    optimizer, its arguments, in order; a pre-hook swaps the closure for its own."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model = _model()
    opt = fastavg.wrap(torch.optim.SGD(model.parameters(), lr=0.1), LAWA(2, every=1))
    opt.step = types.MethodType(step_function, opt)
    log = []

    def record(kind):
        return lambda o, args, kwargs: log.append((kind, type(o).__name__, len(args), sorted(kwargs)))

    def closure():
        return torch.tensor(3.0)

    handles = [
        register_optimizer_step_pre_hook(record("global pre")),
        register_optimizer_step_post_hook(record("global post")),
        opt.register_step_pre_hook(record("pre")),
        opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": closure})),
        opt.register_step_post_hook(record("post")),
        opt.optimizer.register_step_pre_hook(record("inner pre")),
    ]
    try:
        loss = opt.step()
    finally:
        for handle in handles:
            handle.remove()
    assert loss == 3.0 and opt.step_count == 1 and opt.num_averaged() == 1
    return log


def test_step_hooks_run_as_torch_optim_runs_them():
    """AveragedOptimizer's step wrapper skips the profiler label when no profiler runs (10 us per
    step); the hooks must run exactly as under torch's own wrapper (Optimizer.profile_hook_step)."""
    ours = fastavg.AveragedOptimizer.step
    assert ours.hooked  # torch's _patch_step_function does not wrap it a second time
    torchs = torch.optim.Optimizer.profile_hook_step(ours.__wrapped__)
    log = _hook_log(ours)
    assert log == _hook_log(torchs)
    assert [entry[:2] for entry in log] == [
        ("global pre", "AveragedOptimizer"),
        ("pre", "AveragedOptimizer"),
        ("global pre", "SGD"),
        ("inner pre", "SGD"),
        ("global post", "SGD"),
        ("post", "AveragedOptimizer"),
        ("global post", "AveragedOptimizer"),
    ]
    assert log[-1][2:] == (1, ["closure"])  # the hooks after the swap see the new arguments


@pytest.mark.parametrize("returned", ["not a tuple", ((), {}, "a third item")], ids=["str", "3-tuple"])
def test_a_step_pre_hook_returning_something_else_raises_before_any_step(returned):
    model = _model()
    opt = fastavg.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.register_step_pre_hook(lambda o, args, kwargs: returned)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        opt.step()
    assert opt.step_count == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_step_has_its_profiler_label_only_when_a_profiler_runs(monkeypatch):
    model = _model()
    opt = fastavg.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    model(_batch(0)).sum().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        opt.step()
    names = {event.name for event in profile.events()}
    assert {"Optimizer.step#AveragedOptimizer.step", "Optimizer.step#SGD.step"} <= names

    labels = []
    record_function = torch.autograd.profiler.record_function

    def counting(name, *args):
        labels.append(name)
        return record_function(name, *args)

    monkeypatch.setattr(torch.autograd.profiler, "record_function", counting)
    opt.step()
    assert labels == ["Optimizer.step#SGD.step"]  # the inner optimizer's, from torch's own wrapper
    assert opt.step_count == 2


def test_several_param_groups_and_dtypes(backend):
    torch.manual_seed(0)
    body = torch.nn.Linear(4, 4).to(torch.bfloat16)
    head = torch.nn.Linear(4, 2)
    groups = [{"params": body.parameters(), "lr": 0.05}, {"params": head.parameters(), "lr": 0.01, "weight_decay": 0.0}]
    opt = fastavg.wrap(torch.optim.AdamW(groups), {"ema": EMA(0.8), "swa": SWA()}, backend=backend)
    assert len(opt.averager._groups) == 2
    for step in range(6):
        x = _batch(step)[:, :4]
        head(body(x.bfloat16()).float()).square().mean().backward()
        opt.step()
        opt.zero_grad()
    ema = opt.averaged_params("ema")
    assert [e.dtype for e in ema] == [torch.float32] * 4
    weights = [p.detach().clone() for p in (*body.parameters(), *head.parameters())]
    with opt.averaged("ema"):
        assert torch.equal(body.weight.detach(), ema[0].bfloat16()) and torch.equal(head.bias.detach(), ema[3])
    assert all(torch.equal(a, b.detach()) for a, b in zip(weights, (*body.parameters(), *head.parameters())))


def test_compiled_model_sees_the_average():
    model = _model()
    compiled = torch.compile(model)  # inductor: generated C++ reads the parameters by address
    opt = fastavg.wrap(torch.optim.SGD(model.parameters(), lr=0.2), EMA(0.5))
    for step in range(4):
        compiled(_batch(step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    x = _batch(100)
    raw = compiled(x)
    with opt.averaged():
        averaged = compiled(x)
        torch.testing.assert_close(averaged, model(x))
    assert not torch.equal(raw, averaged)
    assert torch.equal(compiled(x), raw)


def test_several_due_averages_are_one_op_call_per_group(monkeypatch, backend):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, dtype=torch.float64))]
    opt = fastavg.wrap(
        torch.optim.SGD(params, lr=0.1), {"e": EMA(0.9), "s": SWA(), "l": LAWA(2, every=1)}, backend=backend
    )
    impls = opt.averager._groups[0].backend.impls
    calls = []
    real = impls["update_"]
    monkeypatch.setitem(impls, "update_", lambda *args: calls.append(args) or real(*args))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert len(calls) == 2  # two groups (float32, float64), each one call for all three averages
    assert all(
        len(args[2]) == 2 and len(args[4]) == 1 for args in calls
    )  # (params, table, averages, weights, rings, slots)


def test_an_update_raising_in_a_later_group_says_the_earlier_groups_moved(monkeypatch, backend):
    # Group 0 (float32) is updated before group 1 (float64) raises: nothing can undo an EMA's lerp,
    # so the error says which groups moved and that a retry would update them twice.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.randn(5, dtype=torch.float64))]
    avg = fastavg.Averager(params, {"e": EMA(0.5), "l": LAWA(2, every=1)}, backend=backend)
    avg.step()
    impls = avg._groups[0].backend.impls
    real = impls["update_"]

    def fails_on_float64(flat_params, *rest):
        if flat_params[0].dtype == torch.float64:
            raise RuntimeError("stand-in kernel failure")
        real(flat_params, *rest)

    monkeypatch.setitem(impls, "update_", fails_on_float64)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    before = avg.averaged_params("e")
    with pytest.raises(RuntimeError, match="stand-in kernel failure") as raised:
        avg.step()
    (note,) = raised.value.__notes__
    assert "at step 2, ['e', 'l'] were already updated in the parameter groups cpu/float32 when the group" in note
    assert "cpu/float64 raised" in note and "update them twice" in note and "reset()" in note
    after = avg.averaged_params("e")
    assert not torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert avg.step_count == 1 and avg.num_averaged("e") == 1

    # The first group raising moved nothing: no note.
    def fails_at_once(*args):
        raise RuntimeError("first")

    monkeypatch.setitem(impls, "update_", fails_at_once)
    with pytest.raises(RuntimeError, match="first") as raised:
        avg.step()
    assert not getattr(raised.value, "__notes__", None)


def test_deepcopy_gives_an_independent_working_copy():
    model = _model()
    opt = fastavg.wrap(torch.optim.AdamW(model.parameters(), lr=0.01), {"e": EMA(0.5), "l": LAWA(2, every=1)})
    model(_batch(0)).square().mean().backward()
    opt.step()
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(_batch(1)).square().mean().backward()
        o.step()
    assert _same_params(model, model2) and opt2.step_count == 2
    assert all(torch.equal(a, b) for a, b in zip(opt.averaged_params("e"), opt2.averaged_params("e")))
    with opt2.averaged("l"):
        assert torch.equal(next(model2.parameters()).detach(), opt2.averaged_params("l")[0])
        assert not torch.equal(next(model.parameters()), next(model2.parameters()))


def test_compiled_training_step_matches_eager_and_does_not_recompile_as_the_schedule_moves(backend):
    from torch._dynamo.utils import counters

    def make():
        model = _model()
        averages = {"ema": EMA(0.9, power=0.7), "swa": SWA(every=2), "lawa": LAWA(3, every=3)}
        return model, fastavg.wrap(torch.optim.AdamW(model.parameters(), lr=0.01), averages, backend=backend)

    def train_step(model, opt, x):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    torch._dynamo.reset()
    eager_model, eager_opt = make()
    model, opt = make()
    compiled_step = torch.compile(train_step)
    frames = []
    for step in range(14):
        train_step(eager_model, eager_opt, _batch(step))
        compiled_step(model, opt, _batch(step))
        frames.append(counters["stats"]["unique_graphs"])
    assert frames[5] == frames[-1], frames  # the moving t, n and ring slot cause no recompiles
    assert opt.step_count == 14 and [opt.num_averaged(n) for n in opt.names] == [14, 7, 3]
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in opt.names:
        for a, b in zip(opt.averaged_params(name), eager_opt.averaged_params(name)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
