"""A job spec in any form a caller has it, as the body of a request.

A spec may be a dict, YAML or JSON text, a `pathlib.Path` of a spec file, or a typed `DistillationJob`.
Local files named in a spec file are relative to that file, as a person reading the file expects; the
services resolve a relative path against their own working folder, so before the spec leaves this machine
each relative path that names an existing file (or model folder) next to the spec is made absolute.
Object-store references (`s3://...`) and absolute paths are left alone.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from stillhouse.common.jobspec import DistillationJob

JSON = "application/json"
YAML = "application/yaml"

# What the spec methods accept.
SpecInput = DistillationJob | dict[str, Any] | str | bytes | Path


def spec_body(spec: SpecInput) -> tuple[bytes, str]:
    """The body and content type to send for `spec`. Text is sent as it is (so the API's line numbers
    match it), YAML unless it looks like JSON; a file likewise, unless it names local files relative to
    itself, which are then made absolute and the document sent as JSON."""
    if isinstance(spec, DistillationJob):
        return json.dumps(spec.to_document()).encode(), JSON
    if isinstance(spec, dict):
        return json.dumps(spec).encode(), JSON
    if isinstance(spec, Path):
        return spec_file_body(spec)
    if isinstance(spec, str | bytes):
        raw = spec.encode() if isinstance(spec, str) else spec
        return raw, JSON if raw.lstrip().startswith(b"{") else YAML
    raise TypeError(
        "a job spec is a dict, YAML or JSON text, a pathlib.Path or a DistillationJob, "
        f"not {type(spec).__name__}"
    )


def spec_file_body(file: Path) -> tuple[bytes, str]:
    raw = file.read_bytes()
    content_type = JSON if file.suffix.lower() == ".json" else YAML
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw, content_type
    resolved = resolve_spec_paths(copy.deepcopy(document), file.parent.absolute())
    if resolved == document:
        return raw, content_type
    return json.dumps(resolved).encode(), JSON


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
