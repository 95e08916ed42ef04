"""Tokenised training examples, prepared once into array_record and read by random access.

    examples = prepared.examples(run.data, tokenizer)  # a Sequence[TokenizedExample]

The first run with a given data config, sources and tokenizer reads and tokenises every example
(`pipeline.training_examples`, on process 0) and writes `<data.data_dir>/examples/<key>/`:

    examples.array_record   one record per example (`encode`: a JSON header and int32 ids)
    index.npz               per example, what the planner reads (`loader.table`), never the ids
    log.json                what the build logged (counts, skipped rows), replayed on every use

`key` hashes the format, the data keys that shape the examples, the bytes of every source file
(a hub name: its name, split and revision) and the tokenizer, so a changed input is a new folder
and a second run, or another host of the same run, opens the same one. A process then holds only
the index in memory (five integers per example) and reads the examples of each step by random
access (grain's ArrayRecordDataSource): its memory and start-up do not grow with the data
(benchmarks/README.md, "Data at scale"). A host that does not see the folder process 0 wrote (a
data_dir that is not shared) prepares its own copy, with a warning.

data_dir may be a bucket (gs://...): the folder is built locally and uploaded (log.json last, so
a folder is complete once its log is there), and every host downloads it to a local temporary
folder to read it (array_record reads local files only).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np
from array_record.python import array_record_module
from etils import epath
from jax.experimental import multihost_utils

from derta_jax import storage
from derta_jax.data import loader, pipeline
from derta_jax.data.tokenize import BuildStats, TokenizedExample

log = logging.getLogger(__name__)

FORMAT = 1  # bump when encode() or the index changes: older folders are then not reused
RECORDS, INDEX, LOG, SUBDIR = "examples.array_record", "index.npz", "log.json", "examples"
_IDS = ("tokens", "uncut", "rejected")  # the id arrays of an example, in record order
# The DataConfig keys that change the examples (not packing: that is the loader's).
_KEYS = ("recipe", "template", "assistant_turns", "eos_text", "cut", "refusal_token",
         "max_length", "seed", "skip_invalid", "helpful_count", "rto_count", "prefix_count",
         "vanilla_count", "pairs_count")


def default_data_dir() -> epath.Path:
    """Where examples are prepared when data.data_dir is empty: $DERTA_JAX_DATA_DIR, else
    ~/.cache/derta_jax."""
    return storage.path(os.environ.get("DERTA_JAX_DATA_DIR") or "~/.cache/derta_jax")


def examples(d: Any, tokenizer: Any) -> "PreparedExamples":
    """The examples of data config `d` (training's DataConfig), prepared into data.data_dir the
    first time, opened (and their build log replayed) every time."""
    folder = storage.path(d.data_dir or default_data_dir()) / SUBDIR / key(d, tokenizer)
    prepared_here, failed = jax.process_index() == 0 and not _complete(folder), None
    if prepared_here:
        try:
            _prepare(d, tokenizer, folder)
        except Exception as e:  # a bad source: every process stops, none waits for process 0
            if jax.process_count() == 1:
                raise
            failed = e
    if jax.process_count() > 1:
        ok = multihost_utils.process_allgather(np.array(failed is None))  # also the barrier
        if failed is not None:
            raise failed
        if not np.all(ok):
            raise ValueError("process 0 could not prepare the training examples (its log says "
                             "why)")
        if not prepared_here and not _complete(folder):
            log.warning("%s is not visible from process %d (data.data_dir is not shared by every "
                        "host): preparing this host's own copy", folder, jax.process_index())
            _prepare(d, tokenizer, folder)
            prepared_here = True
    if not prepared_here:
        _replay(folder)
    return PreparedExamples(folder)


def options(d: Any) -> dict[str, Any]:
    """The `pipeline.tokenised_chunks` / `training_examples` keywords of data config `d`."""
    return dict(recipe=d.recipe, safety=d.source("safety"), helpful=d.source("helpful"),
                max_length=d.max_length, refusal_token=d.refusal_token, template=d.template,
                cut=d.cut, seed=d.seed, skip_invalid=d.skip_invalid, eos_text=d.eos_text,
                assistant_turns=d.assistant_turns, **d.counts())


def key(d: Any, tokenizer: Any) -> str:
    """The prepared folder's name: a hash of everything the examples depend on."""
    parts = {"format": FORMAT, "data": {k: getattr(d, k) for k in _KEYS},
             "sources": [_source_digest(d.source(kind)) for kind in ("safety", "helpful")],
             "tokenizer": _tokenizer_digest(tokenizer)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _source_digest(source: Any) -> dict[str, Any]:
    files = []
    for part in source.parts():
        found = storage.files(part)
        if not found:  # a hub name: what names the data
            files.append({"hub": part, "split": source.split, "revision": source.revision})
        for f in found:
            h = hashlib.sha256()
            with f.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    h.update(block)
            files.append({"file": f.name, "sha256": h.hexdigest()})
    return {"files": files, "split": source.split, "columns": source.columns}


def _tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(
        sorted(tokenizer.get_vocab().items()))
    text = json.dumps([type(tokenizer).__name__, vocab, getattr(tokenizer, "chat_template", None),
                       tokenizer.bos_token, tokenizer.eos_token])
    return hashlib.sha256(text.encode()).hexdigest()


def _complete(folder: epath.Path) -> bool:
    return (folder / LOG).is_file()  # written last


def _prepare(d: Any, tokenizer: Any, folder: epath.Path) -> None:
    """Tokenises `d`'s examples into `folder` (a temporary folder renamed into place, or, for a
    bucket, a local one uploaded file by file)."""
    remote = storage.is_url(folder)
    tmp = storage.temp_dir() if remote else folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        if remote:
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot prepare examples in data.data_dir {folder.parent.parent}: "
                         f"{e.strerror or e}") from None
    writer = array_record_module.ArrayRecordWriter(str(tmp / RECORDS), "group_size:1")
    tables, stats = [], BuildStats()
    try:
        with _captured_logs() as lines:
            for chunk in pipeline.tokenised_chunks(stats, tokenizer, **options(d)):
                for ex in chunk:
                    writer.write(encode(ex))
                tables.append(loader.table_of(chunk))
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    writer.close()
    np.savez(tmp / INDEX, **{name: np.concatenate([t[name] for t in tables] or [np.zeros(0)])
                             .astype(np.int32) for name in loader.TABLE})
    (tmp / LOG).write_text(json.dumps(lines))
    if remote:
        for name in (RECORDS, INDEX, LOG):  # the log last: it marks the folder complete
            storage.upload(tmp / name, folder / name)
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("prepared %d examples in %s", stats.examples, folder)
        return
    try:
        tmp.rename(folder)
    except OSError:  # another run prepared the same folder meanwhile: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(folder):
            raise
    log.info("prepared %d examples in %s", stats.examples, folder)


@contextlib.contextmanager
def _captured_logs() -> Iterator[list[tuple[str, int, str]]]:
    """Collects what the data pipeline logs (as it is shown), to replay on later uses."""
    lines: list[tuple[str, int, str]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append((record.name, record.levelno, record.getMessage()))

    handler, logger = Collect(), logging.getLogger("derta_jax.data")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def _replay(folder: epath.Path) -> None:
    try:
        lines = json.loads((folder / LOG).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder / LOG} is unreadable ({e}); remove {folder} to prepare the "
                         "examples again") from None
    for name, level, message in lines:
        logging.getLogger(name).log(level, "%s", message)
    log.info("examples read from %s", folder)


def encode(ex: TokenizedExample) -> bytes:
    """One example as a record: a 4-byte header length, a JSON header, then its int32 ids."""
    if ex.ref_logps is not None:
        raise ValueError("reference log-probs are attached after preparation, not stored")
    arrays = {name: np.asarray(getattr(ex, name), "<i4") for name in _IDS
              if getattr(ex, name) is not None}
    header = json.dumps({"prompt_len": ex.prompt_len, "refusal_id": ex.refusal_id,
                         "cut_len": ex.cut_len, "max_cut": ex.max_cut,
                         "turns": [list(t) for t in ex.turns],
                         "ids": {name: len(a) for name, a in arrays.items()}}).encode()
    return len(header).to_bytes(4, "little") + header + b"".join(a.tobytes() for a in arrays.values())


def decode(record: bytes) -> TokenizedExample:
    size = int.from_bytes(record[:4], "little")
    header = json.loads(record[4:4 + size])
    ids, offset = {}, 4 + size
    for name, n in header.pop("ids").items():
        ids[name] = np.frombuffer(record, "<i4", n, offset).astype(np.int32)
        offset += 4 * n
    if offset != len(record):
        raise ValueError(f"a record of {len(record)} bytes holds {offset}")
    turns = tuple(tuple(t) for t in header.pop("turns"))
    return TokenizedExample(**header, turns=turns, **ids)


class PreparedExamples(Sequence[TokenizedExample]):
    """A prepared folder's examples, read one at a time; `table` (loader.table: five integers
    per example) is all that is in memory."""

    def __init__(self, folder: epath.Path):
        self.folder = folder
        try:
            local = storage.local_copy(folder)  # a bucket's folder is downloaded
            with np.load(local / INDEX) as f:
                self.table = {name: f[name] for name in loader.TABLE}
            self._records = grain.sources.ArrayRecordDataSource([str(local / RECORDS)])
        except Exception as e:  # numpy and array_record raise many types; name the folder
            raise self._damaged(e) from None
        if len(self._records) != len(self):
            raise self._damaged(f"{len(self._records)} records for {len(self)} index rows")

    def __len__(self) -> int:
        return len(self.table["prompt_len"])

    def __getitem__(self, i: int | slice) -> TokenizedExample | list[TokenizedExample]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        try:
            return decode(self._records[i % len(self)])
        except Exception as e:  # a damaged record: name the folder and what to do
            raise self._damaged(e) from None

    def _damaged(self, why: Any) -> ValueError:
        return ValueError(f"prepared examples in {self.folder} are damaged ({why}); remove the "
                          "folder to prepare them again")
