"""The convergence suite's tasks: small models on data that ships with installed packages.

Every task is deterministic: the model is built under a fixed seed (the same initial weights for
every optimizer), the training batches come in a fixed order (a permutation per epoch from
``seed + epoch``), and the losses that the suite compares are computed on fixed evaluation sets
(the whole training set or a fixed sample of it, and a held-out set), not on the noisy minibatch.

* ``mlp``  — a 3-hidden-layer tanh MLP classifying scikit-learn's 8×8 digits (1797 images).
* ``cnn``  — the package demo's CNN (two 3×3 convs, pool, two linear layers) on the same digits.
* ``autoencoder`` — the classic second-order benchmark shape (a deep, narrow-waisted tanh
  autoencoder, 64-128-64-32-8-32-64-128-64) reconstructing the digits; sigmoid output, binary
  cross-entropy on pixel intensities in [0, 1].
* ``transformer`` — a byte-level, 2-layer pre-norm transformer language model on CPython's own
  standard-library sources (``*.py`` directly in the ``stdlib`` directory, sorted by name, the
  first 1 MB; the last 10% held out), i.e. text that ships with every Python.
* ``word_lm`` — an embedding-heavy LM: a 1-layer transformer (d_model 64) over a 4096-token
  vocabulary, so the embedding and the output head hold 88% of the parameters, on a synthetic
  corpus (``zipf_corpus``: a sparse Markov chain with Zipf-distributed token frequencies; no
  download, the same tokens on every machine). It is the suite's task whose blocks have a
  vocabulary side (``[1024, 64]`` blocks: a 1024² factor is 16× its block).
"""

from __future__ import annotations

import itertools
import math
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import TinyTransformerLM

from lightning_shampoo.demo import _EpochShuffle as EpochShuffle  # the demo's fixed batch order

LossFn = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]


@dataclass
class Task:
    """One benchmark problem. ``lrs``: the AdamW learning-rate grid (4 points, ×√10 apart)."""

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    loss: LossFn
    train: TensorDataset
    train_eval: tuple[Tensor, ...]  # fixed evaluation batch drawn from the training data
    val: tuple[Tensor, ...]  # held-out evaluation batch
    steps: int
    batch_size: int
    lrs: tuple[float, ...]
    eval_every: int = 10
    warmup: int = 0
    seed: int = 0
    notes: dict[str, str] = field(default_factory=dict)

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return self.make_model()

    def loader(self) -> DataLoader:
        sampler = EpochShuffle(len(self.train), self.seed)
        return DataLoader(self.train, batch_size=self.batch_size, sampler=sampler, drop_last=True)


def half_decade_grid(lowest: float, points: int = 4) -> tuple[float, ...]:
    """``points`` learning rates ×√10 apart from ``lowest`` up (rounded to 3 digits)."""
    return tuple(float(f"{lowest * 10 ** (i / 2):.3g}") for i in range(points))


#: The AdamW learning-rate grid of every task (AdamW's best lies inside it on each task).
LR_GRID = half_decade_grid(1e-3)


# ------------------------------------------------------------------------------------ digits


def _digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = round(len(y) * 0.2)
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def _classify(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _reconstruct(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    (x,) = batch
    return nn.functional.binary_cross_entropy_with_logits(model(x), x)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(),
        nn.Linear(64, 10),
    )  # fmt: skip


def _cnn() -> nn.Module:
    from lightning_shampoo.demo import DigitsClassifier

    return DigitsClassifier().net


AUTOENCODER_WIDTHS = (64, 128, 64, 32, 8, 32, 64, 128, 64)


def _autoencoder() -> nn.Module:
    layers: list[nn.Module] = []
    widths = AUTOENCODER_WIDTHS
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)  # logits; the loss applies the sigmoid


def _digits_classifier(
    name: str, model: str, make_model: Callable[[], nn.Module], image: tuple[int, ...], steps: int
) -> Task:
    """A digits classifier task: batch 32, cross-entropy, images shaped ``image``."""
    xt, yt, xv, yv = _digits(0)
    xt, xv = xt.view(-1, *image), xv.view(-1, *image)
    return Task(
        name,
        f"{model}, digits, batch 32, cross-entropy",
        make_model,
        _classify,
        TensorDataset(xt, yt),
        (xt, yt),
        (xv, yv),
        steps=steps,
        batch_size=32,
        lrs=LR_GRID,
        warmup=steps // 20,
    )


def mlp_task(steps: int = 400) -> Task:
    return _digits_classifier("mlp", "MLP 64-128-128-64-10 (tanh)", _mlp, (64,), steps)


def cnn_task(steps: int = 400) -> Task:
    cnn = "CNN conv3x3(16)-conv3x3(32)-pool-512-64-10 (ReLU)"
    return _digits_classifier("cnn", cnn, _cnn, (1, 8, 8), steps)


def autoencoder_task(steps: int = 600) -> Task:
    xt, _, xv, _ = _digits(0)
    widths = "-".join(map(str, AUTOENCODER_WIDTHS))
    return Task(
        "autoencoder",
        f"deep autoencoder {widths} (tanh), digits, batch 64, binary cross-entropy",
        _autoencoder,
        _reconstruct,
        TensorDataset(xt),
        (xt,),
        (xv,),
        steps=steps,
        batch_size=64,
        lrs=LR_GRID,
        warmup=steps // 20,
    )


# ------------------------------------------------------------------------------- transformer

CORPUS_BYTES = 1_000_000


def stdlib_corpus(limit: int = CORPUS_BYTES) -> tuple[bytes, list[str]]:
    """The first ``limit`` bytes of the standard library's top-level ``*.py`` files, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, names, size = [], [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        names.append(path.name)
        size += len(data)
        if size >= limit:
            break
    return b"".join(chunks)[:limit], names


class _LM(nn.Module):
    def __init__(self, seq: int, d_model: int) -> None:
        super().__init__()
        self.lm = TinyTransformerLM(vocab=256, d_model=d_model, layers=2, heads=4, seq=seq)
        nn.init.normal_(self.lm.pos, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.lm(tokens)


def _next_token(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    (tokens,) = batch
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def transformer_task(
    steps: int = 600,
    seq: int = 128,
    d_model: int = 64,
    batch_size: int = 16,
    corpus_bytes: int = CORPUS_BYTES,
) -> Task:
    text, names = stdlib_corpus(corpus_bytes)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    split = math.floor(len(data) * 0.9)
    window = seq + 1
    train = data[: split - split % window].view(-1, window)
    val = data[split : split + (len(data) - split) // window * window].view(-1, window)
    g = torch.Generator().manual_seed(1)
    train_eval = train[torch.randperm(len(train), generator=g)[:64]]
    val_eval = val[torch.randperm(len(val), generator=g)[:64]]
    return Task(
        "transformer",
        f"byte-level transformer LM (2 layers, d {d_model}, 4 heads, context {seq}), stdlib source, "
        f"batch {batch_size}",
        lambda: _LM(seq, d_model),
        _next_token,
        TensorDataset(train),
        (train_eval,),
        (val_eval,),
        steps=steps,
        batch_size=batch_size,
        lrs=LR_GRID,
        eval_every=20,
        warmup=steps // 20,
        notes={"corpus": f"{len(names)} files, {names[0]} … {names[-1]}, {len(text)} bytes"},
    )


# ---------------------------------------------------------------------------------- word LM

WORD_VOCAB = 4096


def zipf_corpus(tokens: int, vocab: int = WORD_VOCAB, seed: int = 0) -> Tensor:
    """A deterministic synthetic token stream with a word-like distribution: unigram frequencies
    ∝ 1/rank (Zipf), and a sparse Markov structure to learn — each token has 4 likely successors
    (drawn from the Zipf law once per token) that follow it half of the time; otherwise the next
    token is a fresh Zipf draw. The optimal loss is well below the unigram entropy."""
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    successors = torch.multinomial(zipf, 4 * vocab, replacement=True, generator=g).view(vocab, 4)
    fresh = torch.multinomial(zipf, tokens, replacement=True, generator=g)
    follow = torch.rand(tokens, generator=g) < 0.5
    pick = torch.randint(0, 4, (tokens,), generator=g)
    out = torch.empty(tokens, dtype=torch.long)
    out[0] = fresh[0]
    prev = int(out[0])
    fresh_l, follow_l, pick_l, succ = fresh.tolist(), follow.tolist(), pick.tolist(), successors.tolist()
    values = [prev]
    for t in range(1, tokens):
        prev = succ[prev][pick_l[t]] if follow_l[t] else fresh_l[t]
        values.append(prev)
    out[:] = torch.tensor(values)
    return out


class _WordLM(nn.Module):
    def __init__(self, seq: int, d_model: int, vocab: int) -> None:
        super().__init__()
        self.lm = TinyTransformerLM(vocab=vocab, d_model=d_model, layers=1, heads=4, seq=seq)
        nn.init.normal_(self.lm.pos, std=0.02)
        nn.init.normal_(self.lm.embed.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.lm(tokens)


def word_lm_task(steps: int = 400, seq: int = 32, d_model: int = 64, batch_size: int = 16) -> Task:
    window = seq + 1
    data = zipf_corpus(200_000)
    split = math.floor(len(data) * 0.9)
    train = data[: split - split % window].view(-1, window)
    val = data[split : split + (len(data) - split) // window * window].view(-1, window)
    g = torch.Generator().manual_seed(1)
    train_eval = train[torch.randperm(len(train), generator=g)[:128]]
    val_eval = val[torch.randperm(len(val), generator=g)[:128]]
    return Task(
        "word_lm",
        f"word-level LM (1 layer, d {d_model}, 4 heads, context {seq}, vocabulary {WORD_VOCAB}), "
        f"synthetic Zipf/Markov tokens, batch {batch_size}",
        lambda: _WordLM(seq, d_model, WORD_VOCAB),
        _next_token,
        TensorDataset(train),
        (train_eval,),
        (val_eval,),
        steps=steps,
        batch_size=batch_size,
        lrs=LR_GRID,
        eval_every=20,
        warmup=steps // 20,
        notes={"corpus": "zipf_corpus(200000): 4096 tokens, Zipf unigrams, 4 successors per token"},
    )


TASKS: dict[str, Callable[[], Task]] = {
    "mlp": mlp_task,
    "cnn": cnn_task,
    "autoencoder": autoencoder_task,
    "transformer": transformer_task,
    "word_lm": word_lm_task,
}
