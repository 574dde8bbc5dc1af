"""One rank of tests/test_sharded.py's run (``torch.distributed.run``, gloo, CPU): FSDP2's DTensor
parameters are refused by ``fastavg.wrap``, and README's recipe (an Averager over each rank's
shard) averages the whole model exactly."""

import gc
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import fastavg

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import fully_shard

backend = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same initial model on every rank
model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.GELU(), torch.nn.Linear(12, 5))
for layer in (model[0], model[2], model):
    fully_shard(layer)
opt = torch.optim.AdamW(model.parameters(), lr=0.05)

try:
    fastavg.wrap(opt, "ema", backend=backend)
    raise AssertionError("wrap accepted DTensor parameters")
except TypeError as err:
    assert "DTensor" in str(err) and "to_local()" in str(err), err

specs = {"ema": fastavg.EMA(decay=0.5), "lawa": fastavg.LAWA(window=2, every=1)}
avg = fastavg.Averager([p.to_local() for p in model.parameters()], specs, backend=backend)
ema, snapshots = None, []
for step in range(5):
    torch.manual_seed(100 + 10 * step + rank)  # each rank its own batch
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    avg.step()
    full = [p.full_tensor().double() for p in model.parameters()]
    snapshots.append(full)
    ema = full if ema is None else [0.5 * e + 0.5 * f for e, f in zip(ema, full)]
expected = {"ema": ema, "lawa": [(a + b) / 2 for a, b in zip(snapshots[-2], snapshots[-1])]}

training = [p.full_tensor().clone() for p in model.parameters()]
x = torch.randn(3, 8)
for name in specs:
    with avg.averaged(name):
        inside = [p.full_tensor().double() for p in model.parameters()]
        seen = model(x)
        # README's export: the whole averaged model, gathered by torch's own full state dict.
        exported = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    for got, want in zip(inside, expected[name]):
        assert (got - want).abs().max().item() < 1e-6, (name, got, want)
    assert all(torch.equal(exported[k].double(), v) for k, v in zip(exported, inside)), name
    reference = torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(x.double(), inside[0], inside[1])), inside[2], inside[3]
    )
    assert (seen.double() - reference).abs().max().item() < 1e-5, name  # the forward saw the average
assert all(torch.equal(a, p.full_tensor()) for a, p in zip(training, model.parameters()))  # restored bit for bit

# Each rank's state dict holds its own shard's averages and loads back on the same shards.
state = avg.state_dict()
again = fastavg.Averager([p.to_local() for p in model.parameters()], specs, backend=backend)
again.load_state_dict(state)
for name in specs:
    assert all(torch.equal(a, b) for a, b in zip(avg.averaged_params(name), again.averaged_params(name))), name
print(f"rank {rank}: ok", flush=True)
# As fastavg-train's _destroy_process_group: the sharded model holds the process group too, and
# whichever owner lets go of it last runs its destructor. At interpreter exit that aborted 1 run
# in 15 here ("terminate called without an active exception"): drop every owner, then destroy it.
del model, opt, avg, again
gc.collect()
dist.destroy_process_group()
