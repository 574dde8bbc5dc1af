"""State dicts of an Averager: build, validate (before anything changes), apply.

Averages are stored per parameter (not per flat group), so a state dict saved with one device
layout or backend loads into another. Only tensors and plain Python values: ``torch.load(...,
weights_only=True)`` reads them.
"""

from __future__ import annotations

import warnings

import torch

from .flat import holds_exactly

FORMAT_VERSION = 1
# Hyper-parameters that may change between save and load (the loading wrapper's own apply).
_SOFT_FIELDS = ("decay", "every", "start", "power", "inv_gamma")


def averager_state(averager) -> dict:
    """The ``"fastavg"`` entry: format version, ``t``, parameter shapes and every average."""
    params = [None] * len(averager._param_names)
    for group in averager._groups:
        for i, index in enumerate(group.index):
            params[index] = {"name": group.names[i], "shape": list(group.params[i].shape)}
    averages = {}
    for name, average in averager._averages.items():
        tensors = [None] * len(params)
        for gi, group in enumerate(averager._groups):
            buffer = average.buffers[gi]
            leading = buffer.shape[:1] if average.is_ring else ()
            for i, index in enumerate(group.index):
                tensors[index] = group.param_view(buffer, i, tuple(leading))
        entry = {"kind": average.spec.kind, "spec": average.spec.to_dict(), "n": average.n, "tensors": tensors}
        if average.is_ring:
            entry["ring_pos"] = average.n % average.spec.window  # the slot the next snapshot goes to
        averages[name] = entry
    return {"version": FORMAT_VERSION, "step": averager._t, "params": params, "averages": averages}


def _fail(message: str):
    raise ValueError(f"cannot load fastavg state: {message}")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validate(averager, sd) -> dict:
    """Check ``sd`` against ``averager``; return what ``apply`` needs. Raises before any change."""
    if not isinstance(sd, dict):
        raise TypeError(f"fastavg state must be a dict, got {type(sd).__name__}")
    if "fastavg" in sd and "version" not in sd:
        _fail(
            "this is an AveragedOptimizer's state dict (the inner optimizer's, with a 'fastavg' entry): "
            "load it with opt.load_state_dict(sd), or give the averager sd['fastavg']"
        )
    if sd.get("version") != FORMAT_VERSION:
        _fail(f"format version {sd.get('version')!r} is not supported (this fastavg reads version {FORMAT_VERSION})")
    if not _is_count(sd.get("step")):
        _fail(f"'step' must be an int >= 0, got {sd.get('step')!r}")
    ours = averager.state_dict()  # views only: cheap, and the one description of our layout
    saved_params = sd.get("params")
    if not isinstance(saved_params, list) or len(saved_params) != len(ours["params"]):
        count = len(saved_params) if isinstance(saved_params, list) else saved_params
        _fail(f"it holds {count} parameters, this optimizer has {len(ours['params'])}")
    for mine, theirs in zip(ours["params"], saved_params):
        if not isinstance(theirs, dict) or list(theirs.get("shape", ())) != mine["shape"]:
            got = theirs.get("shape") if isinstance(theirs, dict) else theirs
            _fail(f"parameter {mine['name']!r} has shape {mine['shape']} here but {got} in the state dict")
    saved = sd.get("averages")
    if not isinstance(saved, dict) or sorted(saved) != sorted(ours["averages"]):
        got = sorted(saved) if isinstance(saved, dict) else saved
        _fail(f"the state dict holds averages {got}, this optimizer keeps {sorted(ours['averages'])}")
    plan = {"step": sd["step"], "averages": {}, "changed": [], "narrowed": []}
    for name, mine in ours["averages"].items():
        theirs = saved[name]
        if theirs.get("kind") != mine["kind"]:
            _fail(f"average {name!r} is {theirs.get('kind')!r} in the state dict but {mine['kind']!r} here")
        spec = theirs.get("spec") or {}
        if mine["kind"] == "lawa" and spec.get("window") != mine["spec"]["window"]:
            _fail(
                f"average {name!r} has LAWA window {spec.get('window')} in the state dict but {mine['spec']['window']} here"
            )
        n = theirs.get("n")
        if not _is_count(n):
            _fail(f"average {name!r}: 'n' must be an int >= 0, got {n!r}")
        if mine["kind"] == "lawa" and theirs.get("ring_pos") != n % mine["spec"]["window"]:
            _fail(f"average {name!r}: ring position {theirs.get('ring_pos')!r} does not match n={n}")
        tensors = theirs.get("tensors")
        if not isinstance(tensors, list) or len(tensors) != len(mine["tensors"]):
            _fail(
                f"average {name!r} holds {len(tensors) if isinstance(tensors, list) else tensors!r} tensors, expected {len(mine['tensors'])}"
            )
        for pname, target, source in zip((p["name"] for p in ours["params"]), mine["tensors"], tensors):
            if not isinstance(source, torch.Tensor) or not source.is_floating_point() or source.shape != target.shape:
                got = list(source.shape) if isinstance(source, torch.Tensor) else type(source).__name__
                _fail(
                    f"average {name!r}, parameter {pname!r}: expected a floating tensor of shape {list(target.shape)}, got {got}"
                )
            if source.is_meta:  # torch.load(..., map_location="meta"): apply() would fail halfway
                _fail(f"average {name!r}, parameter {pname!r}: the tensor is on the meta device and holds no values")
        # Rounded, not refused (a run resumed with another dtype= or other weights' dtype), but said.
        narrowed = sorted(
            {f"{s.dtype} -> {t.dtype}" for t, s in zip(mine["tensors"], tensors) if not holds_exactly(t.dtype, s.dtype)}
        )
        if narrowed:
            plan["narrowed"].append(f"{name}: " + ", ".join(narrowed))
        changed = [f for f in _SOFT_FIELDS if f in mine["spec"] and spec.get(f) != mine["spec"][f]]
        if changed:
            plan["changed"].append(
                f"{name}: " + ", ".join(f"{f} {spec.get(f)!r} -> {mine['spec'][f]!r}" for f in changed)
            )
        plan["averages"][name] = (n, list(zip(mine["tensors"], tensors)))
    return plan


def apply(averager, plan: dict) -> None:
    """Copy a validated state into ``averager``."""
    with torch.no_grad():
        for name, (n, pairs) in plan["averages"].items():
            for target, source in pairs:
                target.copy_(source)  # casts and moves across devices as needed
            averager._averages[name].n = n
    averager._t = plan["step"]
    if plan["narrowed"]:
        warnings.warn(
            "fastavg: the state dict holds averages in a dtype this wrapper's buffers cannot hold exactly; "
            "they were rounded on load (" + "; ".join(plan["narrowed"]) + ")",
            stacklevel=3,
        )
    if plan["changed"]:
        warnings.warn(
            "fastavg: the state dict was saved with other averaging hyper-parameters; this wrapper's own "
            "apply from now on (" + "; ".join(plan["changed"]) + ")",
            stacklevel=3,
        )
