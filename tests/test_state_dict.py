"""state_dict() / load_state_dict(): round trips, bit-exact resume, validation before any change."""

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import CPU_BACKENDS
from helpers import roundtrip, same_state

import fastavg
from fastavg import EMA, LAWA, SWA

SPECS = {"ema": EMA(0.9, power=0.7), "swa": SWA(start=2), "lawa": LAWA(window=3, every=2)}


def _setup(backend="torch", specs=SPECS, seed=0, hidden=6):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 2))
    inner = torch.optim.AdamW(model.parameters(), lr=0.05)
    return model, fastavg.wrap(inner, specs, backend=backend)


def _train(model, opt, first, last):
    for step in range(first, last):
        g = torch.Generator().manual_seed(step)  # the data depends on the step only
        x = torch.randn(8, 4, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], {n: opt.averaged_params(n) for n in opt.names}


def _assert_identical(a, b):
    params_a, avgs_a = a
    params_b, avgs_b = b
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b))
    for name in avgs_a:
        assert all(torch.equal(x, y) for x, y in zip(avgs_a[name], avgs_b[name])), name


def test_resume_is_bit_exact(backend):
    model, opt = _setup(backend)
    _train(model, opt, 0, 20)
    uninterrupted = _snapshot(model, opt)

    model, opt = _setup(backend)
    _train(model, opt, 0, 9)
    checkpoint = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    model2, opt2 = _setup(backend, seed=123)  # fresh objects, other initial values
    model2.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    assert opt2.step_count == 9
    assert [opt2.num_averaged(n) for n in opt2.names] == [opt.num_averaged(n) for n in opt.names]
    _train(model2, opt2, 9, 20)
    _assert_identical(_snapshot(model2, opt2), uninterrupted)


@pytest.mark.parametrize("save_backend", CPU_BACKENDS)
def test_state_saved_with_one_backend_loads_into_another(save_backend, backend):
    model, opt = _setup(save_backend)
    _train(model, opt, 0, 9)
    checkpoint = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    model2, opt2 = _setup(backend, seed=123)
    model2.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    _assert_identical(_snapshot(model2, opt2), _snapshot(model, opt))  # the load itself is exact
    # Continuing: backends may round a lerp differently in the last bit, nothing more.
    _train(model, opt, 9, 20)
    _train(model2, opt2, 9, 20)
    for name in opt.names:
        for a, b in zip(opt2.averaged_params(name), opt.averaged_params(name)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_in_a_fresh_process_is_bit_exact(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from test_state_dict import _setup, _train
        model, opt = _setup()
        ck = torch.load(sys.argv[1], weights_only=True)
        model.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"])
        _train(model, opt, 9, 20)
        torch.save({{"params": [p.detach() for p in model.parameters()],
                    "avgs": {{n: opt.averaged_params(n) for n in opt.names}}}}, sys.argv[2])
        """
    )
    model, opt = _setup()
    _train(model, opt, 0, 9)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    _train(model, opt, 9, 20)
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "ck.pt"), str(tmp_path / "out.pt")], check=True)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    _assert_identical((out["params"], out["avgs"]), _snapshot(model, opt))


def test_state_dict_layout():
    model, opt = _setup()
    _train(model, opt, 0, 5)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "fastavg"}
    fa = sd["fastavg"]
    assert fa["version"] == 1 and fa["step"] == 5
    assert set(fa["averages"]) == set(SPECS)
    lawa = fa["averages"]["lawa"]
    assert lawa["kind"] == "lawa" and lawa["n"] == 2 and lawa["ring_pos"] == 2
    assert lawa["spec"] == {"window": 3, "every": 2, "start": 0}
    assert [t.shape for t in lawa["tensors"]] == [(3, *p.shape) for p in model.parameters()]
    assert [t.shape for t in fa["averages"]["ema"]["tensors"]] == [p.shape for p in model.parameters()]


def _unchanged(model, opt, action):
    before_sd = copy.deepcopy(opt.state_dict())
    before = _snapshot(model, opt)
    action()
    _assert_identical(_snapshot(model, opt), before)
    # The whole state dict bit for bit: fastavg's step and averages, the inner optimizer's state and groups.
    assert same_state(opt.state_dict(), before_sd)


@pytest.mark.parametrize(
    "other, message",
    [
        (lambda: _setup(hidden=5), "shape"),
        (lambda: _setup(specs={"ema": EMA(0.9), "swa": SWA(start=2)}), "averages"),
        (lambda: _setup(specs={**SPECS, "lawa": SWA()}), "'lawa'"),
        (lambda: _setup(specs={**SPECS, "lawa": LAWA(window=4, every=2)}), "window"),
    ],
    ids=["shapes", "names", "kinds", "window"],
)
def test_mismatch_raises_and_leaves_everything_unchanged(other, message):
    model, opt = _setup()
    _train(model, opt, 0, 6)
    other_model, other_opt = other()
    _train(other_model, other_opt, 0, 3)
    sd = roundtrip(other_opt.state_dict())

    def load():
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(sd)

    _unchanged(model, opt, load)


def test_bad_version_and_corrupt_entries_raise_before_change_naming_what_is_wrong():
    model, opt = _setup()
    _train(model, opt, 0, 4)
    for corrupt, message in (
        (lambda sd: sd["fastavg"].update(version=99), "format version 99 is not supported"),
        # An averager's own state dict with no version is an old or foreign file, not a wrapper's.
        (lambda sd: sd["fastavg"].pop("version"), "format version None is not supported"),
        (lambda sd: sd["fastavg"].update(step=-1), "'step' must be an int >= 0, got -1"),
        (lambda sd: sd["fastavg"]["params"].pop(), "it holds 3 parameters, this optimizer has 4"),
        (lambda sd: sd["fastavg"].update(params=None), "it holds None parameters"),
        (lambda sd: sd["fastavg"]["params"][1].update(shape=[5]), r"'param 1' has shape \[6\] here but \[5\]"),
        (lambda sd: sd["fastavg"]["params"].__setitem__(2, "junk"), r"'param 2' has shape \[2, 6\] here but junk"),
        (lambda sd: sd["fastavg"]["averages"]["ema"].update(n="3"), "'ema': 'n' must be an int >= 0, got '3'"),
        (lambda sd: sd["fastavg"]["averages"]["lawa"].update(ring_pos=7), "'lawa': ring position 7 does not match n=2"),
        (lambda sd: sd["fastavg"]["averages"]["swa"]["tensors"].pop(), "'swa' holds 3 tensors, expected 4"),
        (
            lambda sd: sd["fastavg"]["averages"]["swa"]["tensors"].__setitem__(0, torch.zeros(1)),
            r"'swa', parameter 'param 0': expected a floating tensor of shape \[6, 4\], got \[1\]",
        ),
        # torch.load(..., map_location="meta"): every check of shape and dtype passes, no values.
        # The last tensor of the last average: apply() would have copied every other one first.
        (
            lambda sd: sd["fastavg"]["averages"]["lawa"]["tensors"].__setitem__(-1, torch.empty(3, 2, device="meta")),
            "'lawa', parameter 'param 3': the tensor is on the meta device",
        ),
    ):
        sd = copy.deepcopy(opt.state_dict())
        corrupt(sd)

        def load(sd=sd, message=message):
            with pytest.raises(ValueError, match=message):
                opt.load_state_dict(sd)

        _unchanged(model, opt, load)


def test_a_state_dict_saved_before_the_first_step_loads():
    model, opt = _setup()
    sd = roundtrip(opt.state_dict())
    assert sd["fastavg"]["step"] == 0 and all(a["n"] == 0 for a in sd["fastavg"]["averages"].values())
    model2, opt2 = _setup(seed=1)
    _train(model2, opt2, 0, 5)
    opt2.load_state_dict(sd)
    assert opt2.step_count == 0 and all(opt2.num_averaged(n) == 0 for n in opt2.names)


def test_the_wrappers_and_the_averagers_state_dicts_swapped_are_refused_saying_which_is_which():
    model, opt = _setup()
    _train(model, opt, 0, 4)

    def load_the_wrappers_into_the_averager():
        with pytest.raises(ValueError, match=r"an AveragedOptimizer's state dict.*opt.load_state_dict\(sd\)"):
            opt.averager.load_state_dict(opt.state_dict())

    def load_the_averagers_into_the_wrapper():
        with pytest.raises(ValueError, match=r"an Averager's state dict.*opt.averager.load_state_dict\(sd\)"):
            opt.load_state_dict(opt.averager.state_dict())

    _unchanged(model, opt, load_the_wrappers_into_the_averager)
    _unchanged(model, opt, load_the_averagers_into_the_wrapper)


def test_inner_optimizer_mismatch_leaves_averages_unchanged():
    model, opt = _setup()
    _train(model, opt, 0, 4)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]

    def load():
        with pytest.raises(ValueError):
            opt.load_state_dict(sd)

    _unchanged(model, opt, load)


def test_state_dict_hooks_registered_on_the_wrapper_run_as_torch_optim_runs_them():
    model, opt = _setup()
    _train(model, opt, 0, 4)
    calls = []
    opt.optimizer.register_state_dict_pre_hook(lambda o: calls.append(("inner save", o is opt.optimizer)))
    opt.register_state_dict_pre_hook(lambda o: calls.append(("save pre", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": "mine"})  # its result is returned

    def with_new_lr(o, sd):  # its result is what loads
        calls.append(("load pre", o is opt, sd.get("tag")))
        return {**sd, "param_groups": [{**g, "lr": 0.125} for g in sd["param_groups"]]}

    opt.register_load_state_dict_pre_hook(with_new_lr)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load post", o is opt)))
    sd = opt.state_dict()
    assert sd["tag"] == "mine" and "fastavg" in sd
    assert calls == [("save pre", True), ("inner save", True)]
    calls.clear()
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.125 and sd["param_groups"][0]["lr"] == 0.05
    assert calls == [("load pre", True, "mine"), ("load post", True)]
    calls.clear()
    sd["fastavg"]["version"] = 99
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    assert calls == [("load pre", True, "mine")]  # a load that failed runs no post-hook


def test_numpy_hyper_parameters_leave_a_state_dict_torch_load_reads_with_weights_only():
    np = pytest.importorskip("numpy")
    decays = np.linspace(0.9, 0.99, 3)  # float64 scalars: a subclass of float, and still NumPy's
    model, opt = _setup(specs={"ema": EMA(decays[1]), "lawa": LAWA(np.int64(2), every=np.int64(1))})
    _train(model, opt, 0, 3)
    sd = roundtrip(opt.state_dict())
    assert type(sd["fastavg"]["averages"]["ema"]["spec"]["decay"]) is float
    opt.load_state_dict(sd)


def test_other_hyper_parameters_warn_and_own_specs_apply():
    model, opt = _setup()
    _train(model, opt, 0, 6)
    sd = roundtrip(opt.state_dict())
    mine = {"ema": EMA(0.5), "swa": SWA(start=2, every=3), "lawa": LAWA(window=3, every=5)}
    model2, opt2 = _setup(specs=mine)
    with pytest.warns(UserWarning, match="decay") as caught:
        opt2.load_state_dict(sd)
    with pytest.warns(UserWarning, match="decay") as caught_apart:
        _setup(specs=mine)[1].averager.load_state_dict(sd["fastavg"])
    assert [w.filename for w in (*caught, *caught_apart)] == [__file__] * 2  # the caller's line, either way
    assert opt2.averager.specs == mine
    assert opt2.step_count == 6
    assert all(torch.equal(a, b) for a, b in zip(opt2.averaged_params("swa"), opt.averaged_params("swa")))


def test_plain_optimizer_state_dict_loads_with_warning():
    model, opt = _setup()
    _train(model, opt, 0, 5)
    plain = opt.optimizer.state_dict()
    model2, opt2 = _setup()
    _train(model2, opt2, 0, 3)
    with pytest.warns(UserWarning, match="afresh") as caught:
        opt2.load_state_dict(plain)
    assert caught[0].filename == __file__
    assert opt2.step_count == 0 and all(opt2.num_averaged(n) == 0 for n in opt2.names)
    assert str(opt2.optimizer.state_dict()["state"]) == str(plain["state"])


def _setup_sgd(momentum, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.GELU(), torch.nn.Linear(6, 2))
    return model, fastavg.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum), SPECS)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, by design
@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["stateless SGD", "SGD with momentum"])
def test_torch_distributed_checkpoint_resumes_bit_for_bit_with_readmes_recipe(momentum, tmp_path):
    """README's recipe: DCP saves the inner optimizer's state and the averager's beside it, and loads
    both in place (one process, no process group)."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint import state_dict as dcp_state

    def state_of(model, opt):
        return {
            "model": dcp_state.get_model_state_dict(model),
            "optim": dcp_state.get_optimizer_state_dict(model, opt.optimizer),
            "averages": opt.averager.state_dict(),
        }

    model, opt = _setup_sgd(momentum)
    _train(model, opt, 0, 12)
    uninterrupted = _snapshot(model, opt)

    model, opt = _setup_sgd(momentum)
    _train(model, opt, 0, 7)
    before = _snapshot(model, opt)
    dcp.save(state_of(model, opt), checkpoint_id=str(tmp_path / "ckpt"))
    assert opt.step_count == 7
    _assert_identical(_snapshot(model, opt), before)  # the save changed nothing

    model2, opt2 = _setup_sgd(momentum, seed=123)
    loaded = state_of(model2, opt2)
    dcp.load(loaded, checkpoint_id=str(tmp_path / "ckpt"))  # in place, into model2's and opt2's tensors
    dcp_state.set_model_state_dict(model2, loaded["model"])
    dcp_state.set_optimizer_state_dict(model2, opt2.optimizer, loaded["optim"])
    opt2.averager.load_state_dict(loaded["averages"])
    assert opt2.step_count == 7
    _train(model2, opt2, 7, 12)
    _assert_identical(_snapshot(model2, opt2), uninterrupted)


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["stateless SGD", "SGD with momentum"])
def test_the_step_dcp_calls_to_make_optimizer_state_is_no_training_step(momentum):
    """Given the wrapper itself, DCP's get/set_optimizer_state_dict call its step() once with zero
    gradients and lr 0 when the optimizer has no state (stateless SGD: at every save). No count, no
    snapshot; and the set path says in its warning that the averages load apart."""
    dcp_state = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    model, opt = _setup_sgd(momentum)
    fresh = dcp_state.get_optimizer_state_dict(model, opt)  # before any step
    assert opt.step_count == 0 and all(opt.num_averaged(n) == 0 for n in opt.names)
    assert "fastavg" not in fresh  # DCP keeps only 'state' and 'param_groups'
    _train(model, opt, 0, 7)
    before = _snapshot(model, opt)
    dcp_state.get_optimizer_state_dict(model, opt)
    assert opt.step_count == 7
    _assert_identical(_snapshot(model, opt), before)
    model2, opt2 = _setup_sgd(momentum)
    with pytest.warns(UserWarning, match="get_optimizer_state_dict"):
        dcp_state.set_optimizer_state_dict(model2, opt2, dcp_state.get_optimizer_state_dict(model, opt))
    assert opt2.step_count == 0


def test_a_users_function_named_like_dcps_state_maker_still_counts_its_steps():
    # Only DCP's own _init_optim_state (its module, its name) is no training step.
    model, opt = _setup_sgd(0.0)

    def _init_optim_state():
        _train(model, opt, 0, 2)

    _init_optim_state()
    assert opt.step_count == 2 and opt.num_averaged("ema") == 2


def test_averager_state_dict_round_trip(backend):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(5, dtype=torch.float64))]
    avg = fastavg.Averager(params, SPECS, backend=backend)
    for _ in range(7):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        avg.step()
    sd = roundtrip(avg.state_dict())
    fresh = fastavg.Averager(params, SPECS, backend=backend)
    fresh.load_state_dict(sd)
    assert fresh.step_count == 7
    for name in SPECS:
        assert all(torch.equal(a, b) for a, b in zip(fresh.averaged_params(name), avg.averaged_params(name)))
    with pytest.raises(TypeError):
        fresh.load_state_dict([1])


@pytest.mark.cuda
def test_state_dict_moves_between_cuda_and_cpu():
    model, opt = _setup()
    _train(model, opt, 0, 6)
    sd = roundtrip(opt.state_dict())
    model_gpu = copy.deepcopy(model).cuda()
    opt_gpu = fastavg.wrap(torch.optim.AdamW(model_gpu.parameters(), lr=0.05), SPECS)
    opt_gpu.load_state_dict(sd)
    for name in SPECS:
        for a, b in zip(opt_gpu.averaged_params(name), opt.averaged_params(name)):
            assert a.is_cuda and torch.equal(a.cpu(), b)
    back = roundtrip(opt_gpu.state_dict())
    model3, opt3 = _setup()
    opt3.load_state_dict(back)
    for name in SPECS:
        assert all(torch.equal(a, b) for a, b in zip(opt3.averaged_params(name), opt.averaged_params(name)))


def test_averages_rounded_on_load_warn_and_widened_ones_do_not():
    """Averages saved in float64 (dtype=torch.float64) load into float32 buffers, and a float32 LAWA
    ring into bfloat16 parameters' ring, rounded: allowed (a run resumed with other dtypes), but not
    silently. Widening loads are exact and say nothing."""
    torch.manual_seed(0)
    specs = {"ema": EMA(0.9), "lawa": LAWA(window=2, every=1)}

    def averager(param_dtype, average_dtype):
        params = [torch.randn(7, dtype=torch.float32).to(param_dtype), torch.randn(3, 2).to(param_dtype)]
        return fastavg.Averager(params, specs, dtype=average_dtype), params

    wide, params = averager(torch.float32, torch.float64)
    for _ in range(3):
        for p in params:
            p.add_(torch.randn_like(p) / 3)
        wide.step()
    sd = roundtrip(wide.state_dict())

    narrow, _ = averager(torch.bfloat16, None)  # float32 averages, a bfloat16 ring
    with pytest.warns(UserWarning, match="rounded") as caught:
        narrow.load_state_dict(sd)
    message = str(caught[0].message)
    assert "ema: torch.float64 -> torch.float32" in message and "lawa: torch.float32 -> torch.bfloat16" in message
    assert caught[0].filename == __file__
    for n in ("ema", "lawa"):
        for got, saved in zip(narrow.averaged_params(n), wide.averaged_params(n)):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, saved.float(), rtol=1e-2, atol=1e-2)

    wider, _ = averager(torch.float32, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 into float64, bfloat16 into float32: exact, so no warning
        wider.load_state_dict(roundtrip(narrow.state_dict()))
    assert all(torch.equal(a, b.double()) for a, b in zip(wider.averaged_params("ema"), narrow.averaged_params("ema")))
