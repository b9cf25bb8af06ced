"""Examples for training and evaluation: a generator, a local jsonl/json/parquet file, or a hub dataset.

``source`` forms:

* ``"generate:countdown"`` / ``"generate:sudoku"``: synthetic examples (``bgpo.data.generators``);
* a path ending in ``.jsonl``, ``.json`` or ``.parquet``: read with ``datasets.load_dataset``; its one
  split is ``"train"`` (every row), and ``load_train_and_eval`` holds out its last rows for evaluation;
* anything else: a hub dataset name for ``datasets.load_dataset(name, subset, split=split)``.

``field_map`` renames columns to the names the task's prompt and reward read (e.g. MATH's
``{"problem": "question", "solution": "answer"}``).  Examples are plain dicts.
"""
from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Mapping

import torch

from .generators import countdown_examples, sudoku_examples

__all__ = ["load_examples", "load_train_and_eval", "GENERATORS", "PromptOrder", "format_prompt"]

GENERATORS = {"countdown": countdown_examples, "sudoku": sudoku_examples}
_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TEMPLATE_ERRORS = (KeyError, IndexError, AttributeError, TypeError, ValueError)


def _is_local_file(source: str) -> bool:
    return not source.startswith("generate:") and Path(source).suffix in _LOCAL_FORMATS


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

        if _is_local_file(source):
            if not Path(source).is_file():
                raise ValueError(f"data.source: no such file {source!r}")
            if split != "train":
                raise ValueError(f"data.split: a local file has one split, 'train' (all its rows), not {split!r}; "
                                 "give held-out rows as another file in data.eval_source")
            dataset = load_dataset(_LOCAL_FORMATS[Path(source).suffix], data_files=source, split="train")
        else:
            dataset = load_dataset(source, subset, split=split)
        if count is not None:
            dataset = dataset.select(range(min(count, len(dataset))))
        rows = [dict(row) for row in dataset]
    return _rename(rows, field_map) if field_map else rows


def _rename(rows: list[dict], field_map: Mapping[str, str]) -> list[dict]:
    """``rows`` with columns renamed; a rename onto a column that stays (or two onto one name) is an error,
    not a silent loss of one of the two columns."""
    columns = set().union(*rows)
    renamed_to: dict[str, str] = {}
    for old, new in field_map.items():
        if old not in columns or old == new:
            continue
        if new in columns and field_map.get(new, new) == new:
            raise ValueError(f"data.field_map: renaming column {old!r} to {new!r} would overwrite the existing "
                             f"column {new!r}; rename {new!r} too (e.g. {new!r}: 'original_{new}')")
        if new in renamed_to:
            raise ValueError(f"data.field_map: columns {renamed_to[new]!r} and {old!r} are both renamed to {new!r}")
        renamed_to[new] = old
    return [{field_map.get(key, key): value for key, value in row.items()} for row in rows]


def load_train_and_eval(data, *, seed: int, template: str) -> tuple[list[dict], list[dict]]:
    """The training and held-out examples of ``data`` (a ``DataConfig``); the held-out ones are never
    training rows.  With no ``data.eval_source``: a generator draws new examples (prompts not in training),
    a local file holds out its last ``eval_size`` rows (training reads the rows before them, less any whose
    prompt is a held-out one), a hub dataset reads ``data.eval_split``."""
    d = data
    common = dict(subset=d.subset, field_map=d.field_map, generator_options=d.generator)
    if d.eval_size > 0 and d.eval_source is None and _is_local_file(d.source):
        rows = load_examples(d.source, split=d.split, seed=seed, **common)
        if len(rows) <= d.eval_size:
            raise ValueError(f"data.eval_size: {d.source!r} has {len(rows)} rows, so holding out the last "
                             f"{d.eval_size} leaves none to train on; set data.eval_source or a smaller data.eval_size")
        held_out = rows[-d.eval_size:]
        held_out_prompts = {format_prompt(template, e) for e in held_out}
        train = [e for e in rows[:-d.eval_size] if format_prompt(template, e) not in held_out_prompts]
        if not train:
            raise ValueError(f"data.eval_size: every training row of {d.source!r} repeats a held-out prompt")
        return train[: d.train_size], held_out
    train = load_examples(d.source, split=d.split, count=d.train_size, seed=seed, **common)
    if d.eval_size == 0:
        return train, []
    if d.eval_source is None and d.source.startswith("generate:"):
        seen = {format_prompt(template, e) for e in train}
        pool = load_examples(d.source, count=d.eval_size * 4 + 16, seed=seed + 1, **common)
        return train, [e for e in pool if format_prompt(template, e) not in seen][: d.eval_size]
    source = d.eval_source or d.source
    split = "train" if _is_local_file(source) else d.eval_split  # a local eval_source is held out whole
    return train, load_examples(source, split=split, count=d.eval_size, seed=seed + 1, **common)


class _ListField(list):
    """A list field in a prompt: ``{numbers}`` shows ``"3, 5, 7"``, ``{numbers[0]}`` is the element."""

    def __str__(self) -> str:
        return ", ".join(map(str, self))

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def format_prompt(template: str, example: Mapping) -> str:
    """``template.format(**example)`` with lists shown as ``"3, 5, 7"`` (``{numbers[0]}`` indexes the list);
    any template error is a ValueError naming ``data.prompt_template`` and the field."""
    values = {k: _ListField(v) if isinstance(v, (list, tuple)) else v for k, v in example.items()}
    try:
        return template.format(**values)
    except _TEMPLATE_ERRORS as error:
        raise ValueError(f"data.prompt_template: {_template_error(template, values, error)}") from None


def _template_error(template: str, values: Mapping, error: Exception) -> str:
    """Which replacement field of ``template`` fails on ``values``, and why."""
    try:
        fields = [(name, conversion, spec) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as bad:
        return f"{bad} in {template!r}"
    for name, conversion, spec in fields:
        field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        first = re.match(r"[^.\[]*", name)[0]
        if first == "" or first.isdigit():
            return (f"positional field {field!r}: a template names the example's fields, e.g. "
                    f"'{{question}}' (fields: {sorted(values)})")
        if first not in values:
            return (f"field {first!r} is not in the example (fields: {sorted(values)}); "
                    "rename columns with data.field_map")
        try:
            field.format(**values)
        except _TEMPLATE_ERRORS as bad:
            return f"field {field!r}: {type(bad).__name__}: {bad}"
    return f"{type(error).__name__}: {error}"


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
