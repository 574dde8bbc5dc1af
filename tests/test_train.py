"""fastavg-train: presets, the data pipeline, a tiny run end to end, resume, DDP, bad options."""

import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import fastavg
from fastavg.train import cli, data, loop, progress, report
from fastavg.train.model import GPT, config_for

TEXT = ("def f(x):\n    return x * 2  # a line of python\n" * 400).encode()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT)
    return str(path)


def _args(tmp_path, text_file, *extra):
    return cli.parse_args(["--data", text_file, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                           "--steps", "30", "--eval-interval", "10", "--batch-size", "4", "--block-size", "32",
                           "--eval-batches", "2", "--warmup", "5", "--no-progress", *extra])  # fmt: skip


def _saved_weights_losses(out, text_file, cache, n_batches):
    """The mean validation loss of each saved model_<name>.pt over the run's own held-out batches
    (batch 4, context 32), worked out here in one process, without the trainer's evaluate()."""
    corpus = data.load_corpus(text_file, str(cache))
    batches = [data.get_batch(corpus.val, 4, 32, torch.Generator().manual_seed(10_000 + i)) for i in range(n_batches)]
    model = GPT(config_for("nano", data.BYTE_VOCAB, 32)).eval()
    losses = {}
    for name in ("raw", "ema", "swa", "lawa"):
        model.load_state_dict(torch.load(out / f"model_{name}.pt"))
        with torch.no_grad():
            losses[name] = sum(model(x, y)[1].item() for x, y in batches) / n_batches
    return losses


@pytest.mark.parametrize(
    "preset, layers, heads, width, expected",
    [("gpt2", 12, 12, 768, 124e6), ("gpt2-medium", 24, 16, 1024, 355e6), ("gpt2-large", 36, 20, 1280, 774e6)],
    ids=str,
)
def test_gpt2_shapes_and_parameter_counts(preset, layers, heads, width, expected):
    config = config_for(preset, data.BPE_VOCAB)
    assert (config.n_layer, config.n_head, config.n_embd) == (layers, heads, width)  # GPT-2's table
    with torch.device("meta"):
        model = GPT(config)
    assert abs(model.num_params() - expected) / expected < 0.01
    assert model.config.block_size == 1024
    assert model.lm_head.weight is model.wte.weight  # tied
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_nano_is_small_and_weight_decay_only_on_matrices():
    model = GPT(config_for("nano", 256))
    assert model.num_params() < 1_000_000
    decay, no_decay = model.param_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_the_model_is_causal_and_initialised_as_gpt2():
    torch.manual_seed(0)
    model = GPT(config_for("nano", 256)).eval()  # 4 layers, context 128
    idx = torch.randint(256, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 256  # new tokens from position 9 on
    with torch.no_grad():
        before, after = model(idx)[0], model(changed)[0]
    assert torch.equal(before[:, :9], after[:, :9])  # no position sees a later token
    assert not torch.allclose(before[:, 9:], after[:, 9:])
    with pytest.raises(ValueError, match=r"sequence of 129 tokens is longer than the context \(128\)"):
        model(torch.zeros(1, 129, dtype=torch.int64))
    # GPT-2's init: N(0, 0.02), the residual projections scaled by 1/sqrt(2 * layers); LayerNorm at 1.
    for name, p in model.named_parameters():
        expected = 0.02 / math.sqrt(2 * 4) if name.endswith("c_proj.weight") else 0.02
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert p.std().item() == pytest.approx(expected, rel=0.05) and abs(p.mean().item()) < 1e-3, name


def test_default_corpus_is_the_standard_library(tmp_path):
    corpus = data.load_corpus(None, str(tmp_path))
    assert corpus.vocab_size == 256 and "standard library" in corpus.description
    total = sum(os.path.getsize(f) for f in data.stdlib_files())
    assert len(corpus.train) + len(corpus.val) == total > 10_000_000
    assert abs(len(corpus.val) / total - data.VAL_FRACTION) < 1e-6
    again = data.load_corpus(None, str(tmp_path))  # cached: same split, nothing rebuilt
    assert np.array_equal(again.val[:1000], corpus.val[:1000])


def test_text_file_and_folder(tmp_path, text_file):
    one = data.load_corpus(text_file, str(tmp_path / "c"))
    assert bytes(one.train[:20]) == TEXT[:20] and bytes(one.val[-10:]) == TEXT[-10:]
    assert len(one.train) + len(one.val) == len(TEXT)
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"A" * 500)
    (folder / "sub" / "b.txt").write_bytes(b"B" * 499)
    (folder / "sub" / "c.txt").write_bytes(b"C")  # one byte counts; an empty file is left out
    (folder / "sub" / "d.txt").write_bytes(b"")
    two = data.load_corpus(str(folder), str(tmp_path / "c"))
    assert bytes(two.train[:1]) == b"A" and bytes(two.val[-2:]) == b"BC" and len(two.val) == 100
    assert two.description == f"{folder} (3 files, byte-level)"
    cached = [json.loads(meta.read_text()) for meta in (tmp_path / "c").glob("bytes-*/meta.json")]
    assert {"files": 3, "bytes": 1000, "train": 900, "val": 100} in cached  # under the given cache folder


def test_nanogpt_bin_folder(tmp_path):
    folder = tmp_path / "owt"
    folder.mkdir()
    np.arange(5000, dtype=np.uint16).tofile(folder / "train.bin")
    np.arange(300, dtype=np.uint16).tofile(folder / "val.bin")
    corpus = data.load_corpus(str(folder))
    assert corpus.vocab_size == 50304 and len(corpus.train) == 5000 and corpus.train.dtype == np.uint16
    x, y = data.get_batch(corpus.train, 3, 8, torch.Generator().manual_seed(0))
    assert x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))


def test_data_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        data.load_corpus(str(tmp_path / "missing"))
    (tmp_path / "half").mkdir()
    np.zeros(10, dtype=np.uint16).tofile(tmp_path / "half" / "train.bin")
    with pytest.raises(ValueError, match="val.bin"):
        data.load_corpus(str(tmp_path / "half"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no non-empty files"):
        data.load_corpus(str(tmp_path / "empty"))
    monkeypatch.setattr(data, "stdlib_files", lambda: [])  # a standard library stripped to bytecode
    with pytest.raises(ValueError, match=r"standard library \(.*\) holds no \.py files.*--data"):
        data.load_corpus(None, str(tmp_path / "c"))
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 200)
    with pytest.raises(ValueError, match="fewer than one context"):
        data.check_fits(data.load_corpus(str(small), str(tmp_path / "c")), 64)
    (tmp_path / "only_empty").mkdir()
    (tmp_path / "only_empty" / "a.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="no non-empty files"):
        data.load_corpus(str(tmp_path / "only_empty"), str(tmp_path / "c"))


def test_the_default_cache_folder(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
    assert data.default_cache_dir() == "/somewhere/cache/fastavg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/someone")
    assert data.default_cache_dir() == "/home/someone/.cache/fastavg"


def test_the_smallest_corpus_and_every_window_of_it():
    # A split of block + 1 tokens holds exactly one window (inputs and their next tokens); one
    # token fewer holds none. With one token more, both windows are drawn.
    tokens = np.arange(9, dtype=np.uint8)
    data.check_fits(data.Corpus(tokens, tokens, 256, ""), 8)
    with pytest.raises(ValueError, match="the val split has 8 tokens, fewer than one context of 8 \\+ 1"):
        data.check_fits(data.Corpus(tokens, tokens[:8], 256, ""), 8)
    x, y = data.get_batch(tokens, 3, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.arange(8).expand(3, 8)) and torch.equal(y, x + 1)
    x, _ = data.get_batch(np.arange(10, dtype=np.uint8), 200, 8, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1}


def test_tiny_run_end_to_end(tmp_path, text_file, capsys):
    args = _args(tmp_path, text_file)
    last = loop.train(args)
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30] and records[-1] == last
    for r in records:
        assert set(r) == {"step", "tokens", "lr", "train_loss", "val_loss"}
        assert set(r["val_loss"]) == {"raw", "ema", "swa", "lawa"}
        assert all(isinstance(v, float) and v == v for v in r["val_loss"].values())
    assert records[-1]["tokens"] == 30 * 4 * 32
    for name in ("val_loss.png", "model_raw.pt", "model_ema.pt", "model_swa.pt", "model_lawa.pt", "ckpt.pt"):
        assert (out / name).exists(), name
    raw, lawa = torch.load(out / "model_raw.pt"), torch.load(out / "model_lawa.pt")
    assert raw.keys() == lawa.keys() and not all(torch.equal(raw[k], lawa[k]) for k in raw)
    for weights in (raw, lawa):  # the tied embedding is saved once, in each file alike
        assert weights["lm_head.weight"].data_ptr() == weights["wte.weight"].data_ptr()
    # The weights saved for each average are the ones its last validation loss was measured on.
    assert _saved_weights_losses(out, text_file, tmp_path / "cache", 2) == pytest.approx(
        records[-1]["val_loss"], rel=1e-6
    )
    printed = capsys.readouterr().out
    assert printed.startswith("fastavg-train: nano (0.82M parameters) on cpu x1, ")
    assert "validation loss" in printed and "lowest validation loss" in printed


def test_progress_lines(monkeypatch, capsys):
    now = [1000.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])

    def drive(bar, points, loss):
        """Updates at (time, step), an evaluation line, the end: what was printed (stdout, stderr)."""
        for t, step in points:
            now[0] = t
            bar.update(step, loss)
        bar.note("an evaluation")
        bar.close()
        return capsys.readouterr()

    bar = progress.Progress(100, 20, 1000)  # resumed at step 20; stderr is not a terminal here
    out, err = drive(bar, ((1010, 21), (1020, 22), (1040, 50), (1046, 100)), 2.5)
    assert out == "an evaluation\n"
    assert err.splitlines() == [  # in a log: the first line, then one 30 s on or more, and the last
        "[#####...................] 21/100 loss 2.5000 100 tok/s ETA 0:13:10",
        "[############............] 50/100 loss 2.5000 750 tok/s ETA 0:01:06",
        "[########################] 100/100 loss 2.5000 1,739 tok/s ETA 0:00:00",
    ]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    now[0] = 2000.0
    out, err = drive(progress.Progress(10_000, 0, 1), ((2000, 0), (2001, 1)), 1.0)  # on a terminal: every step
    assert out == "an evaluation\n"
    assert err == ("\r[........................] 0/10000 loss 1.0000 0 tok/s ETA ?"
                   "\r[........................] 1/10000 loss 1.0000 1 tok/s ETA 2:46:39\r\033[K\n")  # fmt: skip
    assert [progress._clock(t) for t in (59.9, 60, 3599, 3600, 90061)] == [
        "0:00:59",
        "0:01:00",
        "0:59:59",
        "1:00:00",
        "25:01:01",
    ]
    assert drive(progress.Progress(10, 0, 1, enabled=False), ((2002, 10),), 1.0) == ("an evaluation\n", "")


def test_the_trainer_shows_progress_unless_told_not_to(tmp_path, text_file, capsys):
    loop.train(_args(tmp_path, text_file, "--steps", "5"))
    assert capsys.readouterr().err == ""
    args = _args(tmp_path, text_file, "--steps", "5", "--overwrite")
    args.no_progress = False
    loop.train(args)
    lines = capsys.readouterr().err.splitlines()  # the first step and the last
    assert [line.split(" loss ")[0] for line in lines] == ["[####....................] 1/5", "[" + "#" * 24 + "] 5/5"]


class _Interrupt(Exception):
    pass


def test_final_line_names_the_winner_and_its_margin():
    line = report.final_line({"raw": 1.3863, "ema": 1.4001, "swa": 1.39, "lawa": 1.3791})
    assert line == "lowest validation loss 1.3791 by lawa, 0.0072 below the raw weights' 1.3863"
    line = report.final_line({"raw": 2.8239, "ema": 3.2473, "lawa": 2.9445})
    assert line == "lowest validation loss 2.8239 by raw; the nearest average, lawa, 2.9445"
    assert report.final_line({"raw": 2.5}) == "lowest validation loss 2.5000 by raw"


def test_eval_line_and_summary_table():
    first = {"raw": 2.9, "ema": None, "swa": 2.8, "lawa": 2.8}
    last = {"raw": 2.5, "ema": 2.6, "swa": 2.55, "lawa": 2.45}
    records = [
        {"step": 10, "tokens": 2560, "train_loss": 2.5, "val_loss": first},
        {"step": 1000, "tokens": 2_560_000, "train_loss": 2.0, "val_loss": last},
    ]
    assert report.eval_line(records[0]) == "step     10  train 2.5000  val: raw 2.9000  ema -  swa 2.8000  lawa 2.8000"
    assert report.summary_table(records).splitlines() == [
        "   step       tokens       raw       ema       swa      lawa",
        "-" * 61,
        "     10        2,560   2.9000          -   2.8000*   2.8000*",  # a tie: both marked
        "   1000    2,560,000   2.5000    2.6000    2.5500    2.4500*",
    ]


def test_the_plot_has_a_line_per_average_from_its_first_checkpoint(tmp_path, monkeypatch):
    axes = pytest.importorskip("matplotlib.axes")
    drawn, real_plot = {}, axes.Axes.plot

    def plot(self, xs, ys, **kw):
        drawn[kw["label"]] = (list(xs), list(ys))
        return real_plot(self, xs, ys, **kw)

    monkeypatch.setattr(axes.Axes, "plot", plot)
    records = [
        {"step": 10, "val_loss": {"raw": 2.9, "ema": None, "lawa": None}},
        {"step": 20, "val_loss": {"raw": 2.5, "ema": 2.6, "lawa": None}},
    ]
    assert report.plot(records, str(tmp_path / "val_loss.png"))
    assert drawn == {"raw": ([10, 20], [2.9, 2.5]), "ema": ([20], [2.6])}  # lawa: no point yet, no line
    assert (tmp_path / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_remove_outputs_leaves_the_metrics_and_what_is_not_the_runs(tmp_path):
    names = ["ckpt.pt", "val_loss.png", "model_raw.pt", "model_ema.pt", "model_swa.pt", "model_lawa.pt"]
    for name in [*names, "metrics.jsonl", "notes.txt"]:
        (tmp_path / name).write_text(name)
    report.remove_outputs(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "notes.txt"]
    report.remove_outputs(str(tmp_path))  # nothing left to remove is no error


def test_ranks_whose_averages_differ_are_refused(monkeypatch, capsys):
    opt = fastavg.wrap(torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1), {"ema": fastavg.EMA(decay=0.9)})
    opt.step()
    mine = [float(t.double().sum()) + float(t.double().abs().sum()) for t in opt.averaged_params("ema")]

    def gather_from_two_ranks(out, obj, other=None):
        assert obj == mine
        out[:] = [obj, obj if other is None else other]

    monkeypatch.setattr(report.dist, "all_gather_object", gather_from_two_ranks)
    report.check_identical_averages(opt, 2, 0)
    assert capsys.readouterr().out == "averages identical on all 2 ranks\n"
    report.check_identical_averages(opt, 2, 1)  # only rank 0 says so
    assert capsys.readouterr().out == ""
    other = [mine[0] + 1e-9, *mine[1:]]
    monkeypatch.setattr(report.dist, "all_gather_object", lambda out, obj: gather_from_two_ranks(out, obj, other))
    with pytest.raises(RuntimeError, match="the averages differ between ranks"):
        report.check_identical_averages(opt, 2, 0)


def test_gradient_accumulation_matches_one_larger_batch(tmp_path, text_file):
    # Two micro-batches of 4 draw the same windows as one batch of 8 (one generator, drawn in
    # order), so the two runs differ only by rounding: the micro-batch losses are averaged, not
    # summed, and every token counts.
    one = loop.train(_args(tmp_path / "one", text_file, "--steps", "10", "--batch-size", "8"))
    two = loop.train(_args(tmp_path / "two", text_file, "--steps", "10", "--grad-accum", "2"))
    assert two["tokens"] == one["tokens"] == 10 * 8 * 32
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    # (Their own validation batches differ in size: the same held-out batches judge both.)
    losses = [_saved_weights_losses(tmp_path / run / "run", text_file, tmp_path / "cache", 2) for run in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_resume_after_an_interruption_is_bit_exact(tmp_path, text_file, monkeypatch):
    loop.train(_args(tmp_path / "a", text_file))
    # The same run, killed right after its step-20 checkpoint, then resumed.
    real_note = loop.Progress.note

    def note_then_die(self, text):
        real_note(self, text)
        if text.startswith("step     20"):
            raise _Interrupt

    monkeypatch.setattr(loop.Progress, "note", note_then_die)
    with pytest.raises(_Interrupt):
        loop.train(_args(tmp_path / "b", text_file))
    monkeypatch.setattr(loop.Progress, "note", real_note)
    loop.train(_args(tmp_path / "b", text_file, "--resume"))
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    for name in ("raw", "ema", "swa", "lawa"):
        x, y = torch.load(a / f"model_{name}.pt"), torch.load(b / f"model_{name}.pt")
        assert all(torch.equal(x[k], y[k]) for k in x), name


def test_resume_keeps_the_metrics_when_rewriting_them_fails(tmp_path, text_file, monkeypatch):
    # --resume rewrites metrics.jsonl without the evaluations after the checkpoint. A write that
    # fails there (a full disk) emptied it: the run's history, lost before any training.
    loop.train(_args(tmp_path, text_file))
    metrics = tmp_path / "run" / "metrics.jsonl"
    before = metrics.read_text()

    class DiskFull:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(28, "No space left on device")

        writelines = write

    def open_for_a_full_disk(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return DiskFull(f) if "w" in mode else f

    monkeypatch.setattr(loop, "open", open_for_a_full_disk, raising=False)
    with pytest.raises(OSError, match="No space left"):
        loop.train(_args(tmp_path, text_file, "--resume"))
    assert metrics.read_text() == before and before.count("\n") == 3
    assert not [f.name for f in metrics.parent.iterdir() if ".partial" in f.name]  # nor a half-written copy


def test_two_process_ddp_run(tmp_path, text_file):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastavg.train", "--data", text_file, "--out", str(tmp_path / "ddp"), "--cache-dir",
               str(tmp_path / "cache"), "--steps", "10", "--eval-interval", "5", "--batch-size", "4",
               "--block-size", "32", "--eval-batches", "4", "--no-progress"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "averages identical on all 2 ranks" in result.stdout
    assert "x2" in result.stdout  # one header line, from rank 0 only
    assert result.stdout.count("fastavg-train:") == 1
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10] and records[-1]["tokens"] == 10 * 4 * 32 * 2
    # Each rank evaluated half the held-out batches; the all-reduced mean is that of all four.
    losses = _saved_weights_losses(tmp_path / "ddp", text_file, tmp_path / "cache", 4)
    assert losses == pytest.approx(records[-1]["val_loss"], rel=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "gpt5"], "unknown preset"),
        (["--averages", "ema", "polyak"], "unknown average"),
        (["--averages", "ema", "ema"], "twice"),
        (["--data", "/no/such/path"], "does not exist"),
        (["--steps", "0"], "--steps"),
        (["--block-size", "4096"], "longer than"),
        (["--lr", "1e-3", "--standard-lr"], "one"),
        (["--ema-decay", "1.5"], "ema-decay"),
        (["--resume", "--out", "/tmp/fastavg-no-such-run"], "no checkpoint"),
        (["--resume", "--overwrite"], "--resume and --overwrite together"),
        # The default EMA decay divides by these two: checked before it is worked out.
        (["--lawa-window", "0"], "--lawa-window must be >= 1"),
        (["--eval-interval", "0"], "--eval-interval must be >= 1"),
        (["--lr", "nan"], "--lr must be > 0"),
        (["--lr", "0"], "--lr must be > 0 and finite, got 0.0"),
        (["--lr", "inf"], "--lr must be > 0 and finite"),
        (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
        (["--block-size", "0"], "--block-size must be >= 1, got 0"),
        (["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
        (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        (["--clip", "-1"], "--clip must be >= 0, got -1.0"),
        (["--ema-decay", "1"], "--ema-decay must be in [0, 1), got 1.0"),
        (["--min-lr-ratio", "2"], "--min-lr-ratio must be in [0, 1]"),
        (["--device", "tpu"], "--device must be"),
        (["--backend", "fast"], "invalid choice"),
        (["--out", __file__], "is a file, not a folder"),
        (["--out", os.path.join(__file__, "run")], f"lies under {__file__}, which is a file, not a folder"),
    ],
)
def test_bad_options_fail_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_it_cannot_load_and_warns_of_other_options(tmp_path, text_file, capsys):
    loop.train(_args(tmp_path, text_file, "--steps", "10"))
    ckpt = tmp_path / "run" / "ckpt.pt"
    saved = ckpt.read_bytes()
    for option, value, said in (("--lawa-window", "3", "--lawa-window 5 (now 3)"), ("--block-size", "16", "--block-size 32 (now 16)"),
                                ("--averages", "ema", "--averages ['ema', 'lawa', 'swa'] (now ['ema'])")):  # fmt: skip
        with pytest.raises(SystemExit):
            _args(tmp_path, text_file, "--resume", option, value)
        assert said in capsys.readouterr().err
    # Another order of the same averages, a longer run and another learning rate resume, with a warning.
    args = _args(tmp_path, text_file, "--resume", "--steps", "20", "--lr", "1e-3", "--averages", "lawa", "swa", "ema")
    assert "--steps 10 -> 20, --lr 0.01 -> 0.001" in capsys.readouterr().err
    assert ckpt.read_bytes() == saved  # nothing was overwritten by the refused resumes
    loop.train(args)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        _args(tmp_path, text_file, "--resume")
    assert "cannot read" in capsys.readouterr().err


def test_resume_counts_the_presets_own_context_as_the_same_block_size(tmp_path, capsys):
    # A run made without --block-size saved None: nano's context, 128, given outright is the same.
    saved = {"preset": "nano", "block_size": None, "averages": ["ema", "swa", "lawa"], "lawa_window": 5}
    torch.save({"args": saved, "step": 10}, tmp_path / "ckpt.pt")
    cli.parse_args(["--resume", "--out", str(tmp_path), "--block-size", "128"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--resume", "--out", str(tmp_path), "--block-size", "64"])
    assert "was made with --block-size 128 (now 64)" in capsys.readouterr().err


def test_a_fresh_start_over_an_earlier_run_is_refused_unless_told_to_overwrite(tmp_path, text_file, capsys):
    loop.train(_args(tmp_path, text_file, "--steps", "20"))
    out = tmp_path / "run"
    saved = {name: (out / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl")}
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a forgotten --resume: the run would empty metrics.jsonl at once
        _args(tmp_path, text_file, "--steps", "30")
    err = capsys.readouterr().err
    assert f"--out {out} holds an earlier run (its checkpoint is at step 20 of 20)" in err
    assert "--resume continues it, --overwrite starts afresh" in err
    assert {name: (out / name).read_bytes() for name in saved} == saved
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")  # unreadable is refused all the same
    with pytest.raises(SystemExit):
        _args(tmp_path, text_file)
    assert "is not a checkpoint fastavg-train can read" in capsys.readouterr().err
    loop.train(_args(tmp_path, text_file, "--steps", "10", "--overwrite"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10]
    assert torch.load(out / "ckpt.pt")["step"] == 10


def test_an_average_with_no_checkpoint_leaves_no_weights_file(tmp_path, text_file, capsys):
    # SWA and LAWA take a checkpoint every evaluation interval (10 steps): a 5-step run has none.
    # Their files held the raw weights under the averages' names, and an earlier run's stayed.
    loop.train(_args(tmp_path, text_file, "--steps", "20"))
    out = tmp_path / "run"
    assert all((out / f"model_{name}.pt").exists() for name in ("ema", "swa", "lawa"))
    capsys.readouterr()
    loop.train(_args(tmp_path, text_file, "--steps", "5", "--overwrite"))
    assert not (out / "model_swa.pt").exists() and not (out / "model_lawa.pt").exists()
    raw, ema = torch.load(out / "model_raw.pt"), torch.load(out / "model_ema.pt")
    assert not all(torch.equal(raw[k], ema[k]) for k in raw)
    printed = capsys.readouterr().out
    assert "model_raw.pt, model_ema.pt, ckpt.pt" in printed
    assert "no model_swa.pt: swa had averaged no checkpoint by the last step" in printed
    assert "no model_lawa.pt" in printed


def test_an_overwrite_that_stops_before_its_first_evaluation_leaves_nothing_of_the_earlier_run(
    tmp_path, text_file, monkeypatch, capsys
):
    # The fresh start empties metrics.jsonl at once; the earlier run's checkpoint stayed until the
    # first evaluation, so a --resume after a crash before it continued the run given up.
    loop.train(_args(tmp_path, text_file, "--steps", "20"))
    out = tmp_path / "run"
    real_update = loop.Progress.update

    def update_then_die(self, step, loss):
        real_update(self, step, loss)
        if step == 3:
            raise _Interrupt

    monkeypatch.setattr(loop.Progress, "update", update_then_die)
    with pytest.raises(_Interrupt):
        loop.train(_args(tmp_path, text_file, "--steps", "20", "--overwrite"))
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == ""
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _args(tmp_path, text_file, "--steps", "20", "--resume")
    assert "--resume: no checkpoint at" in capsys.readouterr().err


def test_a_cuda_device_torch_does_not_see_is_refused_by_name(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = types.SimpleNamespace(device="cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda:3 but torch sees no CUDA device"):
        loop._setup_distributed(args)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for count in (1, 3):  # cuda:3 is the fourth device
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        with pytest.raises(SystemExit, match=rf"--device cuda:3 but torch sees {count} CUDA device\(s\)"):
            loop._setup_distributed(args)
    # One process on cuda:3: it becomes the current device, as each rank's does under torchrun.
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert loop._setup_distributed(args) == (0, 1, torch.device("cuda", 3)) and chosen == [3]


def test_an_unavailable_backend_is_refused_before_any_work(tmp_path, text_file, monkeypatch):
    reasons = {"torch": None, "triton": "no Triton here", "native": None}
    monkeypatch.setattr(loop.fastavg, "available_backends", lambda device=None: reasons)
    with pytest.raises(SystemExit, match="--backend triton cannot run on cpu: no Triton here"):
        loop.train(_args(tmp_path, text_file, "--backend", "triton", "--device", "cpu"))
    assert not (tmp_path / "run").exists()


def test_an_out_the_run_cannot_make_is_said_plainly(tmp_path, text_file, monkeypatch):
    args = _args(tmp_path, text_file)
    real_makedirs = os.makedirs

    def refuse_out(path, *rest, **kw):
        if path == args.out:
            raise PermissionError(13, "Permission denied", path)
        return real_makedirs(path, *rest, **kw)

    monkeypatch.setattr(os, "makedirs", refuse_out)
    with pytest.raises(SystemExit, match=r"--out .*: cannot make the output folder \(Permission denied\)$"):
        loop.train(args)


def test_batch_larger_than_the_data_is_refused(tmp_path):
    small = tmp_path / "small.txt"
    small.write_bytes(b"y" * 300)
    args = cli.parse_args(["--data", str(small), "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="fewer than one context"):
        loop.train(args)
    assert not (tmp_path / "r").exists()  # no work, no outputs


def test_defaults_are_the_papers_recipe():
    args = cli.parse_args(["--preset", "gpt2"])
    assert args.lr == 6e-3 and args.batch_size == 16 and args.grad_accum == 8 and args.weight_decay == 0.1
    assert args.clip == 1.0 and args.averages == ["ema", "swa", "lawa"] and args.lawa_window == 5
    assert args.lawa_every == args.eval_interval
    # nanoGPT's schedule: 600,000 steps, 2,000 of warm-up, an evaluation every 1,000 (of 40 batches here).
    assert (args.steps, args.warmup, args.eval_interval, args.eval_batches) == (600_000, 2000, 1000, 40)
    assert cli.parse_args(["--preset", "gpt2", "--standard-lr"]).lr == pytest.approx(6e-4)
    assert (
        cli.parse_args(["--preset", "gpt2-medium"]).lr == 3e-3 and cli.parse_args(["--preset", "gpt2-large"]).lr == 2e-3
    )


def test_the_nano_defaults_and_the_edges_of_each_range(tmp_path):
    args = cli.parse_args(["--out", str(tmp_path)])
    assert (args.preset, args.steps, args.batch_size, args.grad_accum, args.warmup) == ("nano", 2000, 16, 1, 100)
    assert (args.eval_interval, args.eval_batches, args.lr, args.lawa_every) == (100, 10, 1e-2, 100)
    assert args.seed == 1337  # nanoGPT's
    # EMA's horizon 1 / (1 - decay) is the steps LAWA's window spans: 5 checkpoints 100 steps apart.
    assert args.ema_decay == pytest.approx(1 - 1 / 500)
    assert cli.parse_args(["--out", str(tmp_path), "--lawa-window", "2", "--lawa-every", "10"]).ema_decay == 0.95
    for edge in (["--block-size", "1"], ["--block-size", "128"], ["--min-lr-ratio", "0"], ["--min-lr-ratio", "1"],
                 ["--ema-decay", "0"], ["--warmup", "0"], ["--clip", "0"], ["--weight-decay", "0"]):  # fmt: skip
        cli.parse_args(["--out", str(tmp_path), *edge])  # each accepted


def test_learning_rate_schedule():
    args = cli.parse_args(["--steps", "1000", "--warmup", "100", "--lr", "1e-2", "--min-lr-ratio", "0.1"])
    lrs = [loop.lr_at(s, args) for s in range(1000)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[99] == pytest.approx(1e-2)
    assert all(a <= b for a, b in zip(lrs[:100], lrs[1:100]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))  # cosine falls
    assert loop.lr_at(1000, args) == pytest.approx(1e-3)
    # The cosine starts at the peak right after warm-up and is halfway down halfway through the
    # decay; a quarter of the way through it is (1 + cos(pi/4)) / 2 of the way up (peak 1e-2, floor 1e-3).
    assert lrs[100] == pytest.approx(1e-2) and lrs[550] == pytest.approx(1e-3 + 0.5 * 9e-3)
    assert lrs[325] == pytest.approx(1e-3 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-3)
