"""The dequantized copy of a GGUF model: made once, reused, never seen half-written, and loading exactly
what the GGUF file holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stillhouse.common.models import gguf_cache
from stillhouse.common.models.model_loading import (
    EMBEDDED_TEACHER,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model_reference,
)


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF weights")
    return path


def writer(calls: list[Path], content: str = "copy"):
    def write(folder: Path) -> None:
        calls.append(folder)
        (folder / "weights").write_text(content)

    return write


def test_the_copy_is_written_once_and_then_reused(gguf, tmp_path):
    calls: list[Path] = []
    root = tmp_path / "cache"
    first = gguf_cache.plain_copy(gguf, "model", writer(calls), root)
    again = gguf_cache.plain_copy(gguf, "model", writer(calls), root)
    assert first == again and (first / "weights").read_text() == "copy"
    assert len(calls) == 1
    assert [entry.name for entry in root.iterdir()] == [first.name]  # no staging folder left


def test_a_changed_file_gets_a_new_copy(gguf, tmp_path):
    root = tmp_path / "cache"
    before = gguf_cache.plain_copy(gguf, "model", writer([]), root)
    gguf.write_bytes(b"other GGUF weights")
    after = gguf_cache.plain_copy(gguf, "model", writer([], "new"), root)
    assert after != before and (after / "weights").read_text() == "new"


def test_a_failed_write_leaves_nothing_behind(gguf, tmp_path):
    root = tmp_path / "cache"

    def failing(folder: Path) -> None:
        (folder / "weights").write_text("half")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        gguf_cache.plain_copy(gguf, "model", failing, root)
    assert list(root.iterdir()) == []
    assert (gguf_cache.plain_copy(gguf, "model", writer([]), root) / "weights").read_text() == "copy"


def test_when_two_processes_write_at_once_the_first_copy_wins(gguf, tmp_path):
    root = tmp_path / "cache"

    def slow(folder: Path) -> None:
        (folder / "weights").write_text("second")
        gguf_cache.plain_copy(
            gguf, "model", writer([], "first"), root
        )  # the other process finishes meanwhile

    folder = gguf_cache.plain_copy(gguf, "model", slow, root)
    assert (folder / "weights").read_text() == "first"
    assert [entry.name for entry in root.iterdir()] == [folder.name]


def test_an_unwritable_cache_reads_the_file_itself(gguf, tmp_path):
    root = tmp_path / "not-a-folder"
    root.write_text("")
    assert gguf_cache.plain_copy(gguf, "model", writer([]), root) is None


# Dequantizes the shipped SmolLM2 teacher twice: 35 to 43 s of the default suite on 2 cores. That suite
# keeps the tests above of how a copy is made and reused, and reads the teacher's tokenizer through its
# copy (tests/trainer/test_preflight.py); this one checks the whole model's copy against the GGUF itself.
@pytest.mark.slow
def test_the_copy_of_the_embedded_teacher_loads_what_its_gguf_file_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("STILLHOUSE_HOME", str(tmp_path))
    source = resolve_model_reference(EMBEDDED_TEACHER)
    direct = AutoModelForCausalLM.from_pretrained(
        source.folder, gguf_file=source.gguf_file, dtype=torch.float32, local_files_only=True
    )
    direct_tokenizer = AutoTokenizer.from_pretrained(
        source.folder, gguf_file=source.gguf_file, local_files_only=True
    )

    tokenizer = load_tokenizer(source)
    model = load_model(source, torch.device("cpu"), torch.float32)
    copies = sorted((tmp_path / "model-cache" / "gguf").iterdir())
    assert [folder.name.rsplit("-", 1)[1] for folder in copies] == ["model", "tokenizer"]

    expected = direct.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(model.state_dict()[name], expected[name]) for name in expected)
    assert model.config.tie_word_embeddings == direct.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == direct.generation_config.eos_token_id
    assert load_config(source).num_hidden_layers == direct.config.num_hidden_layers
    text = "Hello, naïve café, 東京, emoji 🙂.\n\tdef f(x):\n        return x ** 2"
    assert tokenizer(text).input_ids == direct_tokenizer(text).input_ids
    assert tokenizer.chat_template == direct_tokenizer.chat_template
    assert tokenizer.all_special_tokens == direct_tokenizer.all_special_tokens
    assert all(folder.name.startswith(Path(source.gguf_file).stem) for folder in copies)
    assert Path(model.name_or_path) == copies[0]  # read from the copy, not the GGUF file
    assert Path(tokenizer.name_or_path) == copies[1]
