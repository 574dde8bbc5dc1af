"""Parameter sets the benchmark times: GPT-2 sizes (nanoGPT layout) or one flat tensor."""

from __future__ import annotations

# (layers, width) per preset; GPT-2's vocabulary and context.
GPT2_SIZES = {"gpt2": (12, 768), "gpt2-medium": (24, 1024), "gpt2-large": (36, 1280)}
VOCAB, CONTEXT = 50257, 1024


def gpt2_shapes(layers: int = 12, dim: int = 768, vocab: int = VOCAB, context: int = CONTEXT) -> list[tuple]:
    """nanoGPT GPT-2 with biases and a tied head: 2 + 12 per layer + 2 tensors (148 for 124M)."""
    shapes = [(vocab, dim), (context, dim)]
    for _ in range(layers):
        shapes += [(dim,), (dim,), (dim, 3 * dim), (3 * dim,), (dim, dim), (dim,)]
        shapes += [(dim,), (dim,), (dim, 4 * dim), (4 * dim,), (4 * dim, dim), (dim,)]
    return shapes + [(dim,), (dim,)]


def parameter_shapes(name: str | None, numel: int | None) -> tuple[str, list[tuple]]:
    """(label, shapes) for ``--params NAME`` or ``--numel N``."""
    if numel is not None:
        if numel <= 0:
            raise ValueError(f"--numel must be > 0, got {numel}")
        return f"numel={numel}", [(numel,)]
    if name not in GPT2_SIZES:
        raise ValueError(f"unknown parameter set {name!r}; expected one of {sorted(GPT2_SIZES)} or --numel N")
    return name, gpt2_shapes(*GPT2_SIZES[name])
