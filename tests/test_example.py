"""The README's main job (the small CPU example) runs and prints the comparison."""

from fastavg import example


def test_example_runs_and_prints_every_average(capsys):
    example.main(["--steps", "40", "--eval-every", "20", "--batch", "32"])
    out = capsys.readouterr().out
    assert "raw" in out and "ema" in out and "swa" in out and "lawa" in out
    assert "lowest final validation loss" in out


def test_corpus_is_deterministic():
    a, b = example.load_corpus(10_000), example.load_corpus(10_000)
    assert len(a) == 10_000 and bool((a == b).all())
