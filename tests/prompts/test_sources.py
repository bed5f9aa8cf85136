"""Reading seed prompts: every format, local and s3:// paths, sampling, and every bad input's message."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from stillhouse.common.datasets.records import MESSAGE
from stillhouse.common.input_roots import InputRoots
from stillhouse.common.jobspec import PromptSource
from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.prompts import sources
from stillhouse.prompts.sources import PromptSourceError, count_rows, iter_source, read_lines

BUCKET = "prompts"

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "What is DNS?"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Another?"},
        ]
    },
]
PLAIN = ["Write a haiku about rain.", "Explain recursion.", "Translate 'cat' into French."]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    store = LocalObjectStore(tmp_path / "objects", BUCKET)
    store.ensure_bucket()
    return store


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def beside(store: LocalObjectStore) -> InputRoots:
    """The input roots of these tests: the test's own folder, which holds the store and the local files."""
    return InputRoots.of([store.root.parent])


def read(source: PromptSource, store: LocalObjectStore, seed: int = 0) -> list[list[dict[str, str]]]:
    return [prompt.conversation for prompt in iter_source(source, store, seed, roots=beside(store))]


def groups_of(source: PromptSource, store: LocalObjectStore) -> list[str | None]:
    return [prompt.group for prompt in iter_source(source, store, 0, roots=beside(store))]


def test_rows_may_name_their_group_in_every_format(tmp_path, store):
    rows = [
        {"prompt": "What is a kettle?", "group": "kettle"},
        {"prompt": "Describe a kettle.", "group": "kettle"},
        {"prompt": "What is a lamp?", "group": 7},
        {"prompt": "No group here."},
    ]
    expected = ["kettle", "kettle", "7", None]
    jsonl = write_jsonl(tmp_path / "grouped.jsonl", rows)
    assert groups_of(PromptSource(path=str(jsonl)), store) == expected
    table = pa.table({"prompt": [row["prompt"] for row in rows], "group": ["kettle", "kettle", "7", None]})
    pq.write_table(table, tmp_path / "grouped.parquet")
    assert groups_of(PromptSource(path=str(tmp_path / "grouped.parquet")), store) == expected
    csv_path = tmp_path / "grouped.csv"
    csv_path.write_text(
        "prompt,group\nWhat is a kettle?,kettle\nDescribe a kettle.,kettle\n"
        "What is a lamp?,7\nNo group here.,\n"
    )
    assert groups_of(PromptSource(path=str(csv_path)), store) == expected  # an empty group is none
    # A sample keeps each row's group with it; inline prompts have none.
    assert set(groups_of(PromptSource(path=str(jsonl), limit=2), store)) <= set(expected)
    assert groups_of(PromptSource(inline=["a", "b"]), store) == [None, None]


def test_jsonl_chat_rows_keep_their_system_message_first(tmp_path, store):
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    assert read(PromptSource(path=str(path)), store) == [row["messages"] for row in CHAT_ROWS]


def test_jsonl_plain_rows_read_the_named_column_and_skip_blank_lines(tmp_path, store):
    path = tmp_path / "plain.ndjson"
    path.write_text('{"text": "first", "id": 1}\n\n{"text": "second", "id": 2}\n')
    assert read(PromptSource(path=str(path), column="text"), store) == [user("first"), user("second")]


def test_gzipped_jsonl(tmp_path, store):
    path = tmp_path / "plain.jsonl.gz"
    with gzip.open(path, "wt") as out:
        out.writelines(json.dumps({"prompt": text}) + "\n" for text in PLAIN)
    assert read(PromptSource(path=str(path)), store) == [user(text) for text in PLAIN]


def test_parquet_plain_and_chat_rows_across_row_groups(tmp_path, store):
    plain = tmp_path / "plain.parquet"
    texts = [f"prompt number {i}" for i in range(5000)]
    pq.write_table(pa.table({"prompt": texts, "n": list(range(5000))}), plain, row_group_size=2000)
    assert read(PromptSource(path=str(plain)), store) == [user(text) for text in texts]

    chat = tmp_path / "chat.parquet"
    messages = [row["messages"] for row in CHAT_ROWS]
    pq.write_table(pa.table({"messages": pa.array(messages, pa.list_(MESSAGE))}), chat)
    assert read(PromptSource(path=str(chat)), store) == messages


def test_csv_plain_rows_keep_numeric_looking_text(tmp_path, store):
    path = tmp_path / "seeds.csv"
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["question", "topic"])
        writer.writerows([["12", "maths"], ["Why, exactly, is the sky blue?", "physics"]])
    assert read(PromptSource(path=str(path), column="question"), store) == [
        user("12"),
        user("Why, exactly, is the sky blue?"),
    ]


def test_csv_messages_column_holds_json(tmp_path, store):
    path = tmp_path / "chat.csv"
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["messages"])
        writer.writerows([[json.dumps(row["messages"])] for row in CHAT_ROWS])
    assert read(PromptSource(path=str(path)), store) == [row["messages"] for row in CHAT_ROWS]


def test_explicit_format_overrides_the_extension(tmp_path, store):
    path = write_jsonl(tmp_path / "seeds.txt", [{"prompt": "hello there"}])
    assert read(PromptSource(path=str(path), format="jsonl"), store) == [user("hello there")]


def test_inline_prompts(store):
    assert read(PromptSource(inline=PLAIN), store) == [user(text) for text in PLAIN]


def test_s3_path_reads_from_the_object_store(tmp_path, store):
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    store.put_file("seeds/chat.jsonl", path)
    source = PromptSource(path=f"s3://{BUCKET}/seeds/chat.jsonl")
    assert read(source, store) == [row["messages"] for row in CHAT_ROWS]


def test_limit_is_a_deterministic_bounded_sample_in_source_order(tmp_path, store):
    path = write_jsonl(tmp_path / "many.jsonl", [{"prompt": f"p{i:04d}"} for i in range(1000)])
    source = PromptSource(path=str(path), limit=50)
    first = read(source, store, seed=3)
    assert len(first) == 50
    assert first == read(source, store, seed=3)
    assert first != read(source, store, seed=4)
    texts = [conversation[0]["content"] for conversation in first]
    assert texts == sorted(texts)
    assert len(set(texts)) == 50
    # Not a prefix or any other fixed window: the sample spreads over the file.
    assert int(texts[0][1:]) < 200 and int(texts[-1][1:]) > 800
    assert read(PromptSource(path=str(path), limit=5000), store) == read(PromptSource(path=str(path)), store)


def test_limit_sample_is_uniform(tmp_path, store):
    path = write_jsonl(tmp_path / "ten.jsonl", [{"prompt": f"p{i}"} for i in range(10)])
    counts = dict.fromkeys(range(10), 0)
    for seed in range(2000):
        for conversation in read(PromptSource(path=str(path), limit=3), store, seed=seed):
            counts[int(conversation[0]["content"][1:])] += 1
    # Each row is expected 600 times (2000 draws x 3/10); binomial sd ~20.
    assert all(500 < count < 700 for count in counts.values()), counts


def test_read_lines_for_slot_files(tmp_path, store):
    path = tmp_path / "cities.txt"
    path.write_text("Paris\n\n  Lagos  \nLima\n")
    assert read_lines(str(path), store, beside(store)) == ["Paris", "Lagos", "Lima"]
    store.put_file("slots/cities.txt", path)
    assert read_lines(f"s3://{BUCKET}/slots/cities.txt", store, beside(store)) == ["Paris", "Lagos", "Lima"]


# --- errors ---------------------------------------------------------------------------------------


def raised_by(source: PromptSource, store: LocalObjectStore) -> PromptSourceError:
    with pytest.raises(PromptSourceError) as raised:
        read(source, store)
    return raised.value


def error_of(source: PromptSource, store: LocalObjectStore) -> str:
    return str(raised_by(source, store))


def test_missing_local_file(tmp_path, store):
    error = raised_by(PromptSource(path=str(tmp_path / "nope.jsonl")), store)
    assert "nope.jsonl" in str(error) and "no such file" in str(error)
    assert error.missing


def test_missing_object(store):
    error = raised_by(PromptSource(path=f"s3://{BUCKET}/seeds/gone.jsonl"), store)
    assert f"s3://{BUCKET}/seeds/gone.jsonl" in str(error) and "no such object" in str(error)
    assert error.missing
    assert not raised_by(PromptSource(path="s3://elsewhere/seeds.jsonl"), store).missing


def test_other_bucket_names_both_buckets(store):
    message = error_of(PromptSource(path="s3://elsewhere/seeds.jsonl"), store)
    assert "'elsewhere'" in message and f"'{BUCKET}'" in message


def test_empty_sources(tmp_path, store):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert "empty source" in error_of(PromptSource(path=str(empty)), store)
    empty_parquet = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty_parquet)
    assert "empty source" in error_of(PromptSource(path=str(empty_parquet)), store)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n")
    with pytest.raises(PromptSourceError, match=r"blank\.txt: empty source"):
        read_lines(str(blank), store, beside(store))


def test_wrong_format_for_the_extension(tmp_path, store):
    fake = tmp_path / "really.parquet"
    fake.write_text("prompt\nhello\n")
    message = error_of(PromptSource(path=str(fake)), store)
    assert "really.parquet" in message and "not a readable Parquet file" in message

    binary = tmp_path / "really.jsonl"
    pq.write_table(pa.table({"prompt": ["x"]}), binary)
    assert "not a readable JSONL file" in error_of(PromptSource(path=str(binary)), store)

    unknown = tmp_path / "seeds.xlsx"
    unknown.write_text("x")
    message = error_of(PromptSource(path=str(unknown)), store)
    assert "cannot tell the format" in message and ".parquet" in message


def test_missing_prompt_column_counts_the_columns_found(tmp_path, store):
    path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"question": ["a"], "answer": ["b"]}), path)
    message = error_of(PromptSource(path=str(path)), store)
    # The columns are counted, not named: a file's first line is its content.
    assert "no column 'prompt'" in message and "among its 2 columns" in message
    assert "question" not in message

    csv_path = tmp_path / "seeds.csv"
    csv_path.write_text("question\nwhy?\n")
    assert "among its 1 columns" in error_of(PromptSource(path=str(csv_path)), store)

    jsonl = write_jsonl(tmp_path / "seeds.jsonl", [{"prompt": "ok"}, {"question": "why?"}])
    message = error_of(PromptSource(path=str(jsonl)), store)
    assert "line 2" in message and "among its 1 columns" in message and "question" not in message


@pytest.mark.parametrize(
    ("messages", "cause"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "user"}], "content must be text"),
        ([{"role": "robot", "content": "x"}], "a role other than system, user, assistant"),
        ([{"role": "user", "content": "x", "name": "bob"}], "exactly `role` and `content`"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "only the first"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message"),
    ],
)
def test_malformed_messages_name_the_row(tmp_path, store, messages, cause):
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT_ROWS[0], CHAT_ROWS[1], {"messages": messages}])
    message = error_of(PromptSource(path=str(path)), store)
    assert "chat.jsonl" in message and "row 3" in message and cause in message


def test_bad_plain_rows_name_the_row(tmp_path, store):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "fine"}, {"prompt": 42}])
    assert "row 2, column 'prompt': the prompt must be text, got int" in error_of(
        PromptSource(path=str(path)), store
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "fine"}\n{"prompt": \n')
    assert "line 2 is not valid JSON" in error_of(PromptSource(path=str(broken)), store)


def test_inline_errors_name_the_inline_source(store):
    with pytest.raises(PromptSourceError, match=r"^inline source #2: row 2: the prompt is empty$"):
        list(iter_source(PromptSource(inline=["fine", "   "]), store, 0, index=2))


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".parquet", ".csv"])
def test_a_source_read_in_slices_gives_the_rows_of_the_whole(tmp_path, store, suffix, monkeypatch):
    monkeypatch.setattr(sources, "MARK_ROWS", 4)  # marks every 4 rows: slices seek to them
    monkeypatch.setattr(sources, "BATCH_ROWS", 3)  # Parquet batches that straddle the slices
    texts = [f"Prompt number {n}: what comes after {n}?" for n in range(23)]
    path = tmp_path / f"seeds{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.table({"prompt": texts}), path)
    elif suffix == ".csv":
        pacsv.write_csv(pa.table({"prompt": texts}), path)
    else:
        lines = "".join(
            json.dumps({"prompt": text}) + ("\n\n  \n" if n % 5 == 0 else "\n")
            for n, text in enumerate(texts)
        )
        path.write_bytes(gzip.compress(lines.encode()) if suffix.endswith(".gz") else lines.encode())
    source = PromptSource(path=str(path))

    size = count_rows(source, store, roots=beside(store))
    slices = [range(start, min(start + 5, size.rows)) for start in range(0, size.rows, 5)]
    parts = [
        prompt.conversation
        for rows in slices
        for prompt in iter_source(
            source, store, 0, roots=beside(store), rows=rows, mark=size.mark_before(rows.start)
        )
    ]

    assert size.rows == len(texts)
    assert (len(size.marks) == 6) is (suffix == ".jsonl")
    assert parts == read(source, store) == [user(text) for text in texts]
