"""TFDS builders over JSON-lines files in a manual dir, stored as array_record, read without TF.

    src = load_source("derta_safety", manual_dir="my_data", data_dir="~/tfds")  # my_data/safety.jsonl
    src[0]  # {"query": b"...", "harmful_response": b"...", "safe_response": b"..."}
    triples = decode(src)  # list of dicts of str, in file order, for recipe.build_mixture

Builders (each reads the named file of the manual dir, validated by `records.read_jsonl`):
- `derta_safety`: `safety.jsonl`, triples (official keys `instruction`/`output` accepted);
- `derta_helpful`: `helpful.jsonl`, pairs `{instruction, output}` (+ `rejected` when the row has it);
- `derta_eval`: one config per test set, `<config name>.jsonl` with `question` (+ `answer`).
The demo folder (`pipeline.DEMO_DIR`) is a valid manual dir for all three.
"""
from __future__ import annotations

import os
from typing import Any

import tensorflow_datasets as tfds

from derta_jax.data import records

_FILES = {"derta_safety": "safety.jsonl", "derta_helpful": "helpful.jsonl"}


class _JsonlBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared logic: one `train` split from one validated JSON-lines file of the manual dir."""

    VERSION = tfds.core.Version("1.1.0")  # 1.1.0: the optional fields (records.OPTIONAL)
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the JSON-lines file(s) in the manual dir (see derta_jax/data/sources.py)."
    KIND = ""
    skip_invalid = False

    def _info(self) -> tfds.core.DatasetInfo:
        names = [*records.FIELDS[self.KIND], *records.OPTIONAL.get(self.KIND, {}),
                 *(["answer"] if self.KIND == "eval" else [])]
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({n: tfds.features.Text() for n in names}),
            disable_shuffling=True)  # keep file order: the recipe depends on it

    def _file(self) -> str:
        return _FILES[self.name]

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        path = os.path.join(dl_manager.manual_dir, self._file())
        return {"train": self._generate_examples(path)}

    def _generate_examples(self, path: str):
        rows, _ = records.read_jsonl(path, self.KIND, skip_invalid=self.skip_invalid)
        for i, row in enumerate(rows):
            if self.KIND == "eval":
                row = {"answer": "", **row}
            yield i, {**{name: "" for name in records.OPTIONAL.get(self.KIND, {})}, **row}


class DertaSafety(_JsonlBuilder):
    KIND = "safety"


class DertaHelpful(_JsonlBuilder):
    KIND = "helpful"


class DertaEval(_JsonlBuilder):
    """Pass `config=<test set name>` (e.g. `safety_completionattack`): reads `<name>.jsonl`."""

    KIND = "eval"

    def _file(self) -> str:
        return self.builder_config.name + ".jsonl"


_BUILDERS = {"derta_safety": DertaSafety, "derta_helpful": DertaHelpful, "derta_eval": DertaEval}


def load_source(name: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
                config: str | None = None, skip_invalid: bool = False) -> Any:
    """Prepares (once) and returns the random-access array_record data source of the train split."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown source {name!r}; known: {', '.join(_BUILDERS)}")
    if (name == "derta_eval") != (config is not None):
        raise ValueError("derta_eval needs config=<test set name>; the other sources take none")
    cls = _BUILDERS[name]
    kwargs: dict[str, Any] = {"data_dir": os.fspath(data_dir), "file_format": "array_record"}
    if config is not None:
        kwargs["config"] = tfds.core.BuilderConfig(name=config)
    builder = cls(**kwargs)
    builder.skip_invalid = skip_invalid
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return builder.as_data_source()["train"]


def decode(source: Any) -> list[dict[str, str]]:
    """All records of a data source as dicts of str (TFDS returns text as bytes); an optional
    field stored empty (absent from the row) is left out."""
    optional = {name for fields in records.OPTIONAL.values() for name in fields}
    rows = [{k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in source[i].items()}
            for i in range(len(source))]
    return [{k: v for k, v in row.items() if not (k in optional and v == "")} for row in rows]

