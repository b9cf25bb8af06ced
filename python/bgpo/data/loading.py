"""Examples for training and evaluation: a generator, a local jsonl/json/parquet file, or a hub dataset.

``source`` forms:

* ``"generate:countdown"`` / ``"generate:sudoku"``: synthetic examples (``bgpo.data.generators``);
* a path ending in ``.jsonl``, ``.json`` or ``.parquet``: read with ``datasets.load_dataset``;
* anything else: a hub dataset name for ``datasets.load_dataset(name, subset, split=split)``.

``field_map`` renames columns to the names the task's prompt and reward read (e.g. MATH's
``{"problem": "question", "solution": "answer"}``).  Examples are plain dicts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from .generators import countdown_examples, sudoku_examples

__all__ = ["load_examples", "GENERATORS", "PromptOrder", "format_prompt"]

GENERATORS = {"countdown": countdown_examples, "sudoku": sudoku_examples}
_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_examples(
    source: str,
    *,
    split: str = "train",
    subset: str | None = None,
    count: int | None = None,
    seed: int = 0,
    field_map: Mapping[str, str] | None = None,
    generator_options: Mapping | None = None,
) -> list[dict]:
    """Up to ``count`` examples (all of a file or split when None; a generator needs ``count``)."""
    if source.startswith("generate:"):
        name = source.split(":", 1)[1]
        if name not in GENERATORS:
            raise ValueError(f"data.source: unknown generator {name!r}; expected one of {sorted(GENERATORS)}")
        if count is None:
            raise ValueError("data.train_size: a generated dataset needs a size")
        rows = GENERATORS[name](count, seed=seed, **dict(generator_options or {}))
    else:
        from datasets import load_dataset

        suffix = Path(source).suffix
        if suffix in _LOCAL_FORMATS:
            if not Path(source).is_file():
                raise ValueError(f"data.source: no such file {source!r}")
            dataset = load_dataset(_LOCAL_FORMATS[suffix], data_files=source, split="train")
        else:
            dataset = load_dataset(source, subset, split=split)
        if count is not None:
            dataset = dataset.select(range(min(count, len(dataset))))
        rows = [dict(row) for row in dataset]
    if field_map:
        rows = [{field_map.get(key, key): value for key, value in row.items()} for row in rows]
    return rows


def format_prompt(template: str, example: Mapping) -> str:
    """``template.format(**example)`` with lists shown as ``"3, 5, 7"``; a missing field names itself."""
    values = {k: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in example.items()}
    try:
        return template.format(**values)
    except KeyError as error:
        raise ValueError(
            f"data.prompt_template: field {error.args[0]!r} is not in the example (fields: {sorted(example)}); "
            "rename columns with data.field_map"
        ) from None


class PromptOrder:
    """The order prompts are drawn in: a fresh permutation of the examples per epoch, a pure function of
    the seed, so a run resumed at ``position`` (prompts consumed so far) sees the same prompts."""

    def __init__(self, num_examples: int, seed: int):
        if num_examples < 1:
            raise ValueError("data.source: the training set is empty")
        self.num_examples, self.seed = num_examples, seed
        self._epoch, self._permutation = -1, None

    def indices(self, position: int, count: int) -> list[int]:
        """Example indices of the ``count`` prompts starting at global ``position``."""
        out = []
        for p in range(position, position + count):
            epoch, offset = divmod(p, self.num_examples)
            if epoch != self._epoch:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._permutation = epoch, torch.randperm(self.num_examples, generator=generator)
            out.append(int(self._permutation[offset]))
        return out
