"""Seed prompts from a `PromptSource`: JSONL, Parquet or CSV files (local or s3://), or an inline list.

Files stream with bounded memory: JSONL line by line, Parquet by record batches, CSV through pyarrow's
streaming reader. An object in the store is first downloaded to a temporary file, so that only one batch
of rows is ever in memory. `.gz` JSONL and CSV files are decompressed on the fly.

A row is either a chat row, with `messages` (a list of {role, content}; a `system` message, if any, must
come first and is kept there; the last message is the user's), or a plain row whose `column` holds the
prompt text. A row may also name its `group` (a `group` field or column): prompts of one group land on
the same side of the held-out split (see `split`). `limit` keeps a seeded uniform sample of at most that
many rows (reservoir sampling in one pass), in source order.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stillhouse.common.input_roots import NO_LOCAL_FILES, InputRefused, InputRoots, is_local
from stillhouse.common.jobspec import PromptSource
from stillhouse.common.objectstore.objects import ObjectNotFound, ObjectStore, ObjectStoreError

Conversation = list[dict[str, str]]

FORMAT_BY_EXTENSION = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
}
ROLES = ("system", "user", "assistant")
BATCH_ROWS = 4096
MARK_ROWS = 4096
GROUP_FIELD = "group"


class SourcePrompt(NamedTuple):
    conversation: Conversation
    group: str | None  # the row's `group`, when it names one


class PromptSourceError(ValueError):
    """A source that cannot be read; the message names the source and the cause. `missing` is True when
    the file or object does not exist (the spec may be right and the data not there yet)."""

    def __init__(self, source: str, cause: str, *, missing: bool = False) -> None:
        super().__init__(f"{source}: {cause}")
        self.source = source
        self.missing = missing


def iter_source(
    source: PromptSource,
    store: ObjectStore,
    seed: int,
    *,
    index: int | None = None,
    roots: InputRoots = NO_LOCAL_FILES,
    rows: range | None = None,
    mark: RowMark | None = None,
) -> Iterator[SourcePrompt]:
    """The prompts of one source, streamed (a seeded sample of them when `source.limit` is set).

    `index` is the source's position in `spec.prompts.sources`, used to name an inline source in errors.
    A local file must lie inside `roots`. `rows`: only the rows at these positions (counted from 0, as
    `count_rows` counts them), for a source without a `limit`; rows before them are skipped unparsed
    where the format allows; `mark`: a mark of `count_rows` at or before `rows.start` to seek to first
    (uncompressed JSONL).
    """
    if rows is not None and source.limit is not None:
        raise ValueError("a source with a limit is sampled whole: it cannot be read by rows")
    skip, stop = (0, None) if rows is None else (rows.start, rows.stop)
    if source.inline is not None:
        label = _inline_label(index)
        inline: Iterable[Row] = (
            (number, text, None) for number, text in enumerate(source.inline[skip:stop], start=skip + 1)
        )
        for number, text, _ in _sampled(inline, source, seed, label):
            yield SourcePrompt(_plain(label, number, text), None)
        return
    assert source.path is not None  # the spec requires exactly one of path and inline
    label = f"prompt source {source.path}"
    with _local_copy(source.path, label, store, roots) as path:
        found = _rows(path, _format_of(source, path, label), source.column, label, skip, mark)
        if stop is not None:
            found = islice(found, stop - skip)
        yielded = False
        for number, row, group in _sampled(found, source, seed, label):
            yielded = True
            yield SourcePrompt(_conversation(label, number, row, source.column), group)
        if not yielded and rows is None:
            raise PromptSourceError(label, "empty source: no rows")


class RowMark(NamedTuple):
    """Where a row of a JSONL file starts: rows and lines before it, and its byte offset."""

    row: int
    line: int
    offset: int


class SourceSize(NamedTuple):
    rows: int
    # Every MARK_ROWS-th row of an uncompressed JSONL file, for readers of a later slice to seek to.
    marks: list[RowMark]

    def mark_before(self, row: int) -> RowMark | None:
        """The last mark at or before `row`."""
        found = [mark for mark in self.marks if mark.row <= row]
        return found[-1] if found else None


def count_rows(
    source: PromptSource, store: ObjectStore, *, index: int | None = None, roots: InputRoots = NO_LOCAL_FILES
) -> SourceSize:
    """How many rows `iter_source` reads from a source before sampling (rows are parsed later, where
    they are read). Raises `PromptSourceError` for a source with no rows."""
    if source.inline is not None:
        return SourceSize(len(source.inline), [])
    assert source.path is not None
    label = f"prompt source {source.path}"
    marks: list[RowMark] = []
    with _local_copy(source.path, label, store, roots) as path:
        file_format = _format_of(source, path, label)
        if file_format == "jsonl":
            total, marks = _count_jsonl_rows(path, label)
        elif file_format == "parquet":
            try:
                total = pq.ParquetFile(path).metadata.num_rows
            except (pa.ArrowException, OSError) as error:
                raise PromptSourceError(label, f"not a readable Parquet file ({_cause(error)})") from None
        else:
            total = _count_csv_rows(path, source.column, label)
    if total == 0:
        raise PromptSourceError(label, "empty source: no rows")
    return SourceSize(total, marks)


def _inline_label(index: int | None) -> str:
    return "inline source" if index is None else f"inline source #{index}"


def _count_jsonl_rows(path: Path, label: str) -> tuple[int, list[RowMark]]:
    if path.suffix.lower() == ".gz":
        try:
            with _open_text(path) as lines:
                return sum(1 for line in lines if line.strip()), []
        except (UnicodeDecodeError, OSError, EOFError) as error:
            raise PromptSourceError(label, f"not a readable JSONL file ({error})") from None
    rows, offset, marks = 0, 0, []
    try:
        with path.open("rb") as lines:
            for number, line in enumerate(lines):
                if line.decode("utf-8").strip():
                    if rows % MARK_ROWS == 0:
                        marks.append(RowMark(rows, number, offset))
                    rows += 1
                offset += len(line)
    except (UnicodeDecodeError, OSError) as error:
        raise PromptSourceError(label, f"not a readable JSONL file ({error})") from None
    return rows, marks


def _count_csv_rows(path: Path, column: str, label: str) -> int:
    try:
        reader = pacsv.open_csv(path, convert_options=_csv_options(column))
        return sum(batch.num_rows for batch in reader)
    except (pa.ArrowException, OSError) as error:
        raise PromptSourceError(label, f"not a readable CSV file ({_cause(error)})") from None


def read_lines(path: str, store: ObjectStore, roots: InputRoots = NO_LOCAL_FILES) -> list[str]:
    """The non-empty lines of a text file (s3://, or a local path inside `roots`), stripped: slot values."""
    label = f"slot file {path}"
    with _local_copy(path, label, store, roots) as local:
        try:
            with _open_text(local) as lines:
                values = [line.strip() for line in lines if line.strip()]
        except (UnicodeDecodeError, OSError, EOFError) as error:
            raise PromptSourceError(label, f"not a readable UTF-8 text file ({error})") from None
    if not values:
        raise PromptSourceError(label, "empty source: no non-empty lines")
    return values


# --- where the bytes come from -------------------------------------------------------------------


@contextmanager
def _local_copy(path: str, label: str, store: ObjectStore, roots: InputRoots) -> Iterator[Path]:
    if is_local(path):
        try:
            local = roots.confine(path, label)
        except InputRefused as refused:
            raise PromptSourceError(label, refused.message) from None
        if not local.is_file():
            raise PromptSourceError(label, "no such file", missing=True)
        yield local
        return
    bucket, _, key = path.removeprefix("s3://").partition("/")
    if bucket != store.bucket:
        raise PromptSourceError(
            label, f"bucket {bucket!r} is not the object store's bucket {store.bucket!r}; copy the file there"
        )
    if not key:
        raise PromptSourceError(label, "no object key after the bucket name")
    with tempfile.TemporaryDirectory(prefix="prompt-source-") as folder:
        local = Path(folder) / Path(key).name
        try:
            store.get_file(key, local)
        except ObjectNotFound:
            raise PromptSourceError(
                label, f"no such object in bucket {store.bucket!r}", missing=True
            ) from None
        except ObjectStoreError as error:
            raise PromptSourceError(label, str(error)) from None
        yield local


def _format_of(source: PromptSource, path: Path, label: str) -> str:
    if source.format != "auto":
        return source.format
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    found = FORMAT_BY_EXTENSION.get(suffixes[-1]) if suffixes else None
    if found is None:
        known = ", ".join(sorted(FORMAT_BY_EXTENSION))
        raise PromptSourceError(
            label,
            f"cannot tell the format from the file name (known extensions: {known}, optionally .gz); "
            "set `format`",
        )
    return found


def _open_text(path: Path, offset: int = 0):
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    handle = path.open("rb")
    handle.seek(offset)
    # Lines end at "\n" only, as `count_rows` counts them (and as JSON Lines defines them).
    return io.TextIOWrapper(handle, encoding="utf-8", newline="\n")


# --- rows ------------------------------------------------------------------------------------------


Row = tuple[int, Any, str | None]


def _rows(
    path: Path, file_format: str, column: str, label: str, skip: int = 0, mark: RowMark | None = None
) -> Iterator[Row]:
    """(row number from 1, row, group) triples; a chat row is {"messages": ...}, a plain row its prompt
    value; the group is the row's `group` as text, None when it has none. The first `skip` rows are
    passed over without being parsed (JSONL) or converted (Parquet, CSV)."""
    if file_format == "jsonl":
        return _jsonl_rows(path, column, label, skip, mark)
    if file_format == "parquet":
        return _parquet_rows(path, column, label, skip)
    return _csv_rows(path, column, label, skip)


def _group(value: Any) -> str | None:
    """A row's group as text; None for none or an empty one."""
    return None if value is None else str(value) or None


def _jsonl_rows(path: Path, column: str, label: str, skip: int, mark: RowMark | None) -> Iterator[Row]:
    first_line = 1
    if mark is not None and path.suffix.lower() != ".gz":
        skip, first_line = skip - mark.row, mark.line + 1
    try:
        with _open_text(path, 0 if first_line == 1 or mark is None else mark.offset) as lines:
            for number, line in enumerate(lines, start=first_line):
                if not line.strip():
                    continue
                if skip:
                    skip -= 1
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise PromptSourceError(label, f"line {number} is not valid JSON") from None
                if not isinstance(row, dict):
                    raise PromptSourceError(label, f"line {number} is not a JSON object")
                group = _group(row.get(GROUP_FIELD))
                if "messages" in row:
                    yield number, {"messages": row["messages"]}, group
                elif column in row:
                    yield number, row[column], group
                else:
                    raise PromptSourceError(label, _no_prompt_column(column, list(row), f"line {number}"))
    except (UnicodeDecodeError, OSError, EOFError) as error:
        raise PromptSourceError(label, f"not a readable JSONL file ({error})") from None


def _parquet_rows(path: Path, column: str, label: str, skip: int) -> Iterator[Row]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise PromptSourceError(label, f"not a readable Parquet file ({_cause(error)})") from None
    names = parquet.schema_arrow.names
    chosen = _prompt_column(names, column, label)
    grouped = GROUP_FIELD in names and chosen != GROUP_FIELD
    number = 0
    try:
        for batch in parquet.iter_batches(
            batch_size=BATCH_ROWS, columns=[chosen, GROUP_FIELD] if grouped else [chosen]
        ):
            batch, skip, number = _skipped(batch, skip, number)
            groups = batch.column(1).to_pylist() if grouped else [None] * batch.num_rows
            for value, group in zip(batch.column(0).to_pylist(), groups, strict=True):
                number += 1
                yield number, ({"messages": value} if chosen == "messages" else value), _group(group)
    except (pa.ArrowException, OSError) as error:
        raise PromptSourceError(label, f"not a readable Parquet file ({_cause(error)})") from None


def _csv_rows(path: Path, column: str, label: str, skip: int) -> Iterator[Row]:
    try:
        reader = pacsv.open_csv(path, convert_options=_csv_options(column))
    except (pa.ArrowException, OSError) as error:
        raise PromptSourceError(label, f"not a readable CSV file ({_cause(error)})") from None
    chosen = _prompt_column(reader.schema.names, column, label)
    grouped = GROUP_FIELD in reader.schema.names and chosen != GROUP_FIELD
    number = 0
    try:
        for whole in reader:
            batch, skip, number = _skipped(whole, skip, number)
            groups = batch.column(GROUP_FIELD).to_pylist() if grouped else [None] * batch.num_rows
            for value, group in zip(batch.column(chosen).to_pylist(), groups, strict=True):
                number += 1
                if chosen == "messages":
                    try:
                        value = json.loads(value) if value is not None else None
                    except ValueError:
                        raise PromptSourceError(
                            label, f"row {number}: `messages` is not valid JSON"
                        ) from None
                    yield number, {"messages": value}, _group(group)
                else:
                    yield number, value, _group(group)
    except (pa.ArrowException, OSError) as error:
        raise PromptSourceError(label, f"not a readable CSV file ({_cause(error)})") from None


def _skipped(batch: pa.RecordBatch, skip: int, number: int) -> tuple[pa.RecordBatch, int, int]:
    """The batch without the rows still to skip; the rows left to skip; the row number reached."""
    passed = min(skip, batch.num_rows)
    return batch.slice(passed), skip - passed, number + passed


def _csv_options(column: str) -> pacsv.ConvertOptions:
    return pacsv.ConvertOptions(
        column_types={"messages": pa.string(), column: pa.string(), GROUP_FIELD: pa.string()}
    )


def _cause(error: Exception) -> str:
    """What went wrong reading a file, without the parser's message, which may quote the file."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return type(error).__name__


def _prompt_column(names: list[str], column: str, label: str) -> str:
    if "messages" in names:
        return "messages"
    if column in names:
        return column
    raise PromptSourceError(label, _no_prompt_column(column, names, "the file"))


def _no_prompt_column(column: str, found: list[str], where: str) -> str:
    # The names found are not quoted: a refused file's first line is its content.
    return f"{where} has no `messages` column and no column {column!r} among its {len(found)} columns"


def _sampled(rows: Iterable[Row], source: PromptSource, seed: int, label: str) -> Iterator[Row]:
    """All rows, or a uniform sample of `source.limit` of them (reservoir sampling), in source order."""
    if source.limit is None:
        yield from rows
        return
    rng = random.Random(f"{seed}:{label}")
    reservoir: list[Row] = []
    for seen, row in enumerate(rows):
        if seen < source.limit:
            reservoir.append(row)
        else:
            slot = rng.randrange(seen + 1)
            if slot < source.limit:
                reservoir[slot] = row
    reservoir.sort(key=lambda row: row[0])
    yield from reservoir


# --- conversations ---------------------------------------------------------------------------------


def _conversation(label: str, number: int, row: Any, column: str) -> Conversation:
    if isinstance(row, dict):
        return _chat(label, number, row["messages"])
    return _plain(label, number, row, column)


def _plain(label: str, number: int, text: Any, column: str | None = None) -> Conversation:
    where = f"row {number}" + (f", column {column!r}" if column else "")
    if not isinstance(text, str):
        raise PromptSourceError(label, f"{where}: the prompt must be text, got {_kind(text)}")
    if not text.strip():
        raise PromptSourceError(label, f"{where}: the prompt is empty")
    return [{"role": "user", "content": text}]


def _chat(label: str, number: int, messages: Any) -> Conversation:
    def malformed(cause: str) -> PromptSourceError:
        return PromptSourceError(label, f"row {number}: malformed `messages`: {cause}")

    if not isinstance(messages, list) or not messages:
        raise malformed(f"expected a non-empty list of {{role, content}} objects, got {_kind(messages)}")
    conversation = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise malformed(f"message {index} must be an object with exactly `role` and `content`")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise malformed(f"message {index} has a role other than {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise malformed(f"message {index} content must be text, got {_kind(content)}")
        if role == "system" and index != 0:
            raise malformed(f"message {index} is a system message; only the first message may be one")
        conversation.append({"role": role, "content": content})
    if conversation[-1]["role"] != "user":
        raise malformed("the last message must be the user's (the one the teacher answers)")
    return conversation


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
