"""Local files named in a job spec are relative to the spec file, as a user reading the file expects.

The services resolve a relative path against their own working folder, which is not where the user's
spec lives; so before a spec leaves this machine, each relative path that names an existing file next to
the spec is made absolute. Object-store references (`s3://...`) and absolute paths are left alone.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from stillhouse.cli.api_client import content_type_for


def _resolved(value: Any, base: Path, *, folders: bool = False) -> Any:
    if not isinstance(value, str) or "://" in value or Path(value).is_absolute():
        return value
    candidate = (base / value).resolve()
    found = candidate.is_file() or (folders and candidate.is_dir())
    return str(candidate) if found else value


def _resolve_models(spec: dict[str, Any], base: Path) -> None:
    """Model folders (and .gguf files): a local teacher, the teacher's tokenizer, a pretrained student.
    A name that is no path next to the spec (`smollm2`, `<distribution>/<file>`) is left as it is."""
    teacher = spec.get("teacher")
    if isinstance(teacher, dict):
        for key in ("model", "tokenizer"):
            if key in teacher:
                teacher[key] = _resolved(teacher[key], base, folders=True)
    init = spec.get("student", {}).get("init") if isinstance(spec.get("student"), dict) else None
    if isinstance(init, dict) and "pretrained" in init:
        init["pretrained"] = _resolved(init["pretrained"], base, folders=True)


def resolve_spec_paths(document: Any, base: Path) -> Any:
    """`document` with `spec.prompts.sources[].path`, `spec.prompts.generate.slotFiles` and the model
    paths (`teacher.model`, `teacher.tokenizer`, `student.init.pretrained`) made absolute against `base`
    where they name files (or model folders) there. Anything malformed is returned as it is, for the API
    to refuse with its own message."""
    spec = document.get("spec") if isinstance(document, dict) else None
    if isinstance(spec, dict):
        _resolve_models(spec, base)
    prompts = spec.get("prompts") if isinstance(spec, dict) else None
    if not isinstance(prompts, dict):
        return document
    for source in prompts.get("sources") or []:
        if isinstance(source, dict) and "path" in source:
            source["path"] = _resolved(source["path"], base)
    generate = prompts.get("generate")
    slot_files = generate.get("slotFiles") if isinstance(generate, dict) else None
    if isinstance(slot_files, dict):
        for slot, path in slot_files.items():
            slot_files[slot] = _resolved(path, base)
    return document


def spec_request_body(file: Path) -> tuple[bytes, str]:
    """The body and content type to send for the spec in `file`: the file as it is, unless it names local
    files relative to itself, which are made absolute (then sent as JSON)."""
    raw = file.read_bytes()
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw, content_type_for(file)
    resolved = resolve_spec_paths(copy.deepcopy(document), file.parent.absolute())
    if resolved == document:
        return raw, content_type_for(file)
    return json.dumps(resolved).encode(), "application/json"
