"""Run solution notebooks, time them and tabulate the key figures they report.

    python -m labkit.bench solutions                 # run every solution, print a table, write _build/bench.md
    python -m labkit.bench --write solutions/X.ipynb # also store the fresh outputs in the notebook (authors)
    python -m labkit.bench --nn [--seconds S]        # labkit.nn at nanoGPT's CPU recipe (or for S seconds)

Notebooks report their key figures with :func:`labkit.report`; this command collects them
through the ``LABKIT_REPORT`` file. It is a benchmark, not a test: nothing here fails on a time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
# nanoGPT's character-level recipe on a CPU (its README): 4 layers of width 128, 4 heads, blocks of 64
# characters, batches of 12, 2000 steps; evaluated, as nanoGPT does, on 200 batches.
RECIPE = {"n_layers": 4, "d_model": 128, "n_heads": 4, "block_size": 64, "batch_size": 12, "steps": 2000,
          "eval_batches": 200}


def run_notebook(path: Path, write: bool = False, timeout: int = 600) -> tuple[float, list[dict]]:
    """Execute a notebook in its own folder; return the wall seconds and the reported figures."""
    notebook = nbformat.read(path, as_version=4)
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as report:
        report_path = report.name
    os.environ["LABKIT_REPORT"] = report_path
    try:
        client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
        figures = [json.loads(line) for line in Path(report_path).read_text().splitlines()]
    finally:
        os.environ.pop("LABKIT_REPORT", None)
        os.unlink(report_path)
    if write:
        nbformat.write(notebook, path)
    return seconds, figures


def nn_recipe(seconds: float | None = None, steps: int = RECIPE["steps"], seed: int = 0) -> dict:
    """Train ``labkit.nn.Decoder`` at nanoGPT's CPU recipe on a text as long as its tiny-shakespeare;
    return the tokens per second of training and the final validation loss (nats per character)."""
    from labkit import nn as lnn
    from labkit.data import CharTokenizer, tiny_shakespeare_size_text, train_val_split
    from labkit.train import train

    text = tiny_shakespeare_size_text()
    tokenizer = CharTokenizer(text)
    train_data, val_data = train_val_split(tokenizer.encode(text))
    torch.manual_seed(seed)
    config = lnn.Config(tokenizer.vocab_size, RECIPE["d_model"], RECIPE["n_layers"], RECIPE["n_heads"],
                        max_len=RECIPE["block_size"])
    model = lnn.Decoder(config)
    lr = 3e-3
    history = train(model, train_data, val_data, steps=steps, block_size=RECIPE["block_size"],
                    batch_size=RECIPE["batch_size"], optimizer=lnn.adamw(model, lr), lr=lr, warmup=100,
                    min_lr=lr / 10, grad_clip=1.0, eval_every=steps, eval_batches=RECIPE["eval_batches"],
                    max_seconds=seconds, seed=seed)
    return {"steps": history.steps[-1], "seconds": history.seconds, "tokens per second": history.tokens_per_second,
            "validation loss": history.final_val_loss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks or folders of notebooks")
    parser.add_argument("--write", action="store_true", help="store the fresh outputs in the notebooks")
    parser.add_argument("--nn", action="store_true", help="also train labkit.nn at nanoGPT's CPU recipe")
    parser.add_argument("--seconds", type=float, default=None, help="with --nn: train for this long instead")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "bench.md")
    args = parser.parse_args(argv)
    notebooks = [n for p in args.paths for n in (sorted(p.glob("*.ipynb")) if p.is_dir() else [p])]
    rows = ["| notebook | wall seconds | key figures |", "|---|---:|---|"]
    for path in notebooks:
        seconds, figures = run_notebook(path, write=args.write)
        shown = "; ".join(f"{f['name']} = {f['value']:.4g} {f['unit']}".strip() for f in figures)
        rows.append(f"| {path.name} | {seconds:.1f} | {shown} |")
        print(rows[-1], flush=True)
    if args.nn:
        result = nn_recipe(args.seconds)
        rows.append(f"| labkit.nn, nanoGPT's CPU recipe ({result['steps']} steps) | {result['seconds']:.1f} | "
                    f"tokens per second = {result['tokens per second']:.0f}; "
                    f"validation loss = {result['validation loss']:.4f} nats/char |")
        print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    print("\n".join(rows))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
