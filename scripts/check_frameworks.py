"""By hand, not in CI: a wrapped optimizer through Lightning, accelerate and transformers' Trainer.

    pip install lightning accelerate transformers && python scripts/check_frameworks.py

Each framework drives ``opt.step()`` its own way (Lightning through its LightningOptimizer with a
closure, accelerate through AcceleratedOptimizer, transformers' Trainer directly); each must count
every step and keep the averages. README, "Supported", records the versions this last passed with.
"""

import torch

import fastavg

torch.manual_seed(0)
X = torch.randn(64, 6)
Y = X @ torch.randn(6, 1)
BATCHES = 64 // 8


def lightning_run() -> str:
    import lightning as L

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(6, 1)

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = fastavg.wrap(torch.optim.SGD(self.parameters(), lr=0.05), "lawa", window=3, every=2)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=5)]

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=8)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(Model(), loader)
    opt = trainer.optimizers[0]
    opt = getattr(opt, "_optimizer", opt)
    assert isinstance(opt, fastavg.AveragedOptimizer)
    assert opt.step_count == trainer.global_step == 2 * BATCHES and opt.num_averaged() == 3
    return f"lightning {L.__version__}"


def accelerate_run() -> str:
    import accelerate

    acc = accelerate.Accelerator(cpu=True)
    net = torch.nn.Linear(6, 1)
    opt = fastavg.wrap(torch.optim.AdamW(net.parameters(), lr=0.01), "ema", decay=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=8)
    net, wrapped, loader = acc.prepare(net, opt, loader)
    for x, y in loader:
        acc.backward(torch.nn.functional.mse_loss(net(x), y))
        wrapped.step()
        wrapped.zero_grad()
    assert opt.step_count == BATCHES and opt.num_averaged() == BATCHES
    assert "fastavg" in wrapped.state_dict()
    return f"accelerate {accelerate.__version__}"


def transformers_run(out_dir: str) -> str:
    import transformers

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(6, 1)

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(X)

        def __getitem__(self, i):
            return {"x": X[i], "labels": Y[i]}

    model = Model()
    opt = fastavg.wrap(torch.optim.AdamW(model.parameters(), lr=0.01), "ema", decay=0.9)
    args = transformers.TrainingArguments(output_dir=out_dir, num_train_epochs=1, per_device_train_batch_size=8,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no")  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=Data(), optimizers=(opt, None)).train()
    assert opt.step_count == BATCHES and opt.num_averaged() == BATCHES
    before = [p.detach().clone() for p in model.parameters()]
    with opt.averaged():
        assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return f"transformers {transformers.__version__}"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        passed = [lightning_run(), accelerate_run(), transformers_run(out)]
    print(f"ok with torch {torch.__version__}: " + ", ".join(passed))
