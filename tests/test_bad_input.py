"""API.md's Bad input: clear errors, raised before anything is modified."""

import pytest
import torch
from helpers import make_params

import fastavg
from fastavg import EMA, SWA


def test_non_floating_parameter_raises_value_error():
    with pytest.raises(ValueError, match="floating"):
        fastavg.Averager([torch.zeros(3, dtype=torch.int64)], "ema")


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_parameter_raises_value_error(layout):
    sparse = torch.eye(3).to_sparse() if layout == "coo" else torch.eye(3).to_sparse_csr()
    with pytest.raises(ValueError, match=f"'param 0' is sparse \\(torch.sparse_{layout}\\)"):
        fastavg.Averager([sparse], "ema")


def test_meta_parameter_raises_value_error_naming_it():
    # Deferred initialisation builds the model on the meta device; wrapping before it is
    # materialised would average nothing, and to_empty() would go unnoticed (every data_ptr is 0).
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="'weight' is on the meta device.*materialise"):
        fastavg.Averager(model.named_parameters(), "ema")


@pytest.mark.parametrize("second", ["same tensor", "overlapping view", "one element inside", "another dtype's view"])
def test_parameters_sharing_memory_raise_value_error_naming_both(second):
    # Swapping an average into one would change the other, whose backup then holds the average:
    # the training values could not come back bit for bit.
    base = torch.randn(64)
    other = {
        "same tensor": lambda: base,
        "overlapping view": lambda: base[8:24],
        "one element inside": lambda: base[5:6],
        "another dtype's view": lambda: base[60:].view(torch.bfloat16),
    }[second]()
    params = [("a", torch.nn.Parameter(base)), ("apart", torch.randn(5)), ("b", torch.nn.Parameter(other))]
    with pytest.raises(ValueError, match="parameters '(a|b)' and '(a|b)' share memory"):
        fastavg.Averager(params, "ema")


def test_parameters_side_by_side_in_one_buffer_are_accepted():
    # Views of one buffer that do not overlap (contiguous parameter buffers, as Megatron's) are fine,
    # and so are empty parameters at the same address as another, or inside one: they hold nothing.
    base = torch.randn(64)
    avg = fastavg.Averager([base[:10], base[10:64], base[10:10], base[30:30]], "ema")
    avg.step()
    assert [t.shape for t in avg.averaged_params()] == [(10,), (54,), (0,), (0,)]


@pytest.mark.parametrize(
    "view", [lambda: torch.zeros(4, 4)[:, ::2], lambda: torch.zeros(4)[::2], lambda: torch.zeros(3, 3)[:2, :2]]
)
def test_gapped_parameter_raises_value_error(view):
    # Two elements with a gap count too: only empty and one-element tensors skip the stride check.
    with pytest.raises(ValueError, match="has gaps or overlaps in memory; only dense"):
        fastavg.Averager([view()], "ema")


@pytest.mark.parametrize(
    "params, exc",
    [(torch.zeros(3), TypeError), (5, TypeError), (["x"], TypeError), ([], ValueError)],
)
def test_bad_params_container(params, exc):
    with pytest.raises(exc):
        fastavg.Averager(params, "ema")


@pytest.mark.parametrize(
    "module", [torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2))], ids=["Linear", "Sequential"]
)
def test_a_module_given_for_params_or_optimizer_says_what_to_pass(module):
    with pytest.raises(TypeError, match=r"got the module (Linear|Sequential): pass model.parameters\(\)"):
        fastavg.Averager(module, "ema")
    with pytest.raises(TypeError, match=r"got the module (Linear|Sequential): wrap the optimizer"):
        fastavg.wrap(module, "ema")


def test_a_mapping_or_an_uncalled_method_given_for_params_says_what_to_pass():
    # A dict iterates over its names: "parameter 0 is a str" said what went wrong, not what to pass.
    model = torch.nn.Linear(2, 2)
    for mapping in (model.state_dict(), dict(model.named_parameters())):
        with pytest.raises(TypeError, match=r"got (OrderedDict|dict), a mapping .*or its \.items\(\)"):
            fastavg.Averager(mapping, "ema")
    with pytest.raises(TypeError, match=r"got dict, a mapping .*a list of param groups: \[group\]"):
        fastavg.Averager({"params": list(model.parameters())}, "ema")
    with pytest.raises(TypeError, match="got method parameters: call it"):
        fastavg.Averager(model.parameters, "ema")


def test_duplicate_parameter_raises():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="more than once"):
        fastavg.Averager([p, p], "ema")


def test_wrong_argument_types():
    params = make_params([(2,)])
    with pytest.raises(TypeError):
        fastavg.Averager(params, 3)
    with pytest.raises(ValueError, match="unknown averaging"):
        fastavg.Averager(params, "polyak")
    with pytest.raises(TypeError):
        fastavg.Averager(params, EMA(), decay=0.5)
    with pytest.raises(TypeError):
        fastavg.Averager(params, {"e": EMA()}, decay=0.5)
    with pytest.raises(TypeError):
        fastavg.Averager(params, {"e": "ema"})
    with pytest.raises(TypeError):
        fastavg.Averager(params, {1: EMA()})
    with pytest.raises(TypeError):
        fastavg.Averager(params, "ema", bogus=1)
    with pytest.raises(TypeError):
        fastavg.Averager(params, "ema", backend=1)
    with pytest.raises(ValueError, match="unknown backend"):
        fastavg.Averager(params, "ema", backend="cuda")
    with pytest.raises(TypeError, match="name"):
        fastavg.Averager(params, "ema").averaged_params(0)


def _model_and_opt(averaging=None):
    model = torch.nn.Linear(3, 2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, fastavg.wrap(inner, averaging or EMA(0.9))


def _step(model, opt):
    model(torch.ones(1, 3)).sum().backward()
    opt.step()


@pytest.mark.parametrize(
    "replace",
    [
        lambda m: setattr(m.weight, "data", m.weight.data.clone()),
        lambda m: setattr(m.weight, "data", torch.zeros(2, 4)),
        lambda m: m.to(torch.float64),
        lambda m: m.weight.data.resize_(12),  # grows the shared storage: new memory
        lambda m: setattr(m.weight, "data", m.weight.data.view(3, 2)),  # same memory, new shape
    ],
    ids=["new-storage", "new-shape", "model.to", "resize", "same-storage-new-shape"],
)
@pytest.mark.parametrize("check", ["compiled", "python"])
def test_replaced_parameter_raises_before_inner_step_and_before_t_advances(replace, check):
    model, opt = _model_and_opt()
    if check == "python":  # the check without fastavg._C (flat.py): map() over the getters
        for group in opt.averager._groups:
            group._unchanged = None
    elif opt.averager._groups[0]._unchanged is None:
        pytest.skip("fastavg._C is not built: only the Python check exists")
    _step(model, opt)
    replace(model)
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    model.zero_grad()
    model.weight.grad = torch.ones_like(model.weight)
    model.bias.grad = torch.ones_like(model.bias)
    with pytest.raises(RuntimeError, match="'weight'|param 0") as info:
        opt.step()
    assert "replaced" in str(info.value)
    assert opt.step_count == 1
    assert torch.equal(model.weight.detach(), weight) and torch.equal(
        model.bias.detach(), bias
    )  # inner step did not run
    with pytest.raises(RuntimeError, match="replaced"):
        with opt.averaged():
            pass
    with pytest.raises(RuntimeError, match="replaced"):
        opt.averaged_params()


def test_replacement_detected_only_on_steps_that_update():
    # No average due at step 2: the step runs (nothing reads the stale memory); step 3 raises.
    model, opt = _model_and_opt(SWA(every=3))
    _step(model, opt)
    model.weight.data = model.weight.data.clone()
    _step(model, opt)
    assert opt.step_count == 2
    with pytest.raises(RuntimeError, match="replaced"):
        _step(model, opt)
    assert opt.step_count == 2


def test_parameter_names_from_named_parameters_appear_in_errors():
    model = torch.nn.Linear(3, 2)
    avg = fastavg.Averager(model.named_parameters(), "ema")
    model.bias.data = torch.zeros(2)
    with pytest.raises(RuntimeError, match="'bias'"):
        avg.step()
