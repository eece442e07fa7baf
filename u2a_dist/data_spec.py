"""Where one data set comes from and how to read it (``DataSpec``, the value of every data key
of a run's config), and the helpers that name its source and paths."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMAS = ("pairs", "hh-rlhf", "refusal-pairs", "completions", "prompts", "qa", "trl")


@dataclass
class DataSpec:
    """Where one data set comes from and how to read it."""

    path: str = field(metadata={"help": "jsonl/json/csv/parquet (or .gz), a directory, "
                                        "`builtin:NAME`, a hub id; in Python a datasets.Dataset."})
    schema: str = field(default="pairs", metadata={"help": f"One of {SCHEMAS}."})
    field: str | None = dataclasses.field(default=None, metadata={
        "help": "Which side a pair schema feeds a completion set: chosen|rejected (trl: by role)."})
    filter: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={
        "help": "Keep rows whose attributes equal these values, e.g. {harmful: 1}."})
    split: str | None = dataclasses.field(default=None, metadata={
        "help": "train|eval: deterministic split by prompt hash (no prompt in both)."})
    eval_fraction: float = dataclasses.field(default=0.2, metadata={
        "help": "Share of prompts put in `eval`."})
    limit: int | None = dataclasses.field(default=None, metadata={"help": "Keep at most N rows."})
    hub_split: str = dataclasses.field(default="train", metadata={"help": "A hub set's split."})
    exclude: list[DataSpec] = dataclasses.field(default_factory=list, metadata={
        "help": "Drop rows whose prompt occurs in these prompt specs (a source kept out of "
                "training); data.hold_out_sources fills it."})
    columns: dict[str, str] = dataclasses.field(default_factory=dict, metadata={
        "help": "The file's names of the schema's fields, e.g. {prompt: question}."})
    source: str | None = dataclasses.field(default=None, metadata={
        "help": "Name of the prompt source (e.g. advbench, alpaca) for evaluation by source "
                "and held-out checks; default: builtin:NAME's NAME or the file name's stem."})
    label: str | None = dataclasses.field(default=None, metadata={
        "help": "The rows' ground truth, for reports only (a noisy pool's `harmful` negatives "
                "and `benign` false positives): training and selection never read it."})
    near_duplicates: int = dataclasses.field(default=0, metadata={
        "help": "Add N near-duplicates of the rows read (seeded small edits of prompt and "
                "response; id `<id>~dup<k>`), as flagged logs repeat themselves."})


def spec_paths(spec: DataSpec | list[DataSpec] | None) -> str:
    """The path(s) of one spec or a list of them, for messages."""
    return ", ".join(s.path for s in as_list(spec)) or "(none)"


def as_list(spec: DataSpec | list[DataSpec] | None) -> list[DataSpec]:
    return spec if isinstance(spec, list) else [spec] if spec is not None else []


def source_name(spec: DataSpec) -> str:
    """``spec.source``, else ``builtin:NAME`` → NAME, else the file's name without its data
    and ``.gz`` suffixes (``harmful_harmbench_test.json`` → ``harmful_harmbench_test``)."""
    if spec.source or not isinstance(spec.path, str):  # an in-memory Dataset: no file name
        return spec.source or "dataset"
    if spec.path.startswith("builtin:"):
        return spec.path[len("builtin:"):]
    name = Path(spec.path.rstrip("/")).name.removesuffix(".gz")
    for suffix in (".jsonl", ".json", ".csv", ".parquet"):
        name = name.removesuffix(suffix)
    return name
