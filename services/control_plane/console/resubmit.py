"""A job's stored document as the YAML the submit page starts from: its spec with every default filled
in, less the fields left empty (null), when leaving them out gives the very same job."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from stillhouse.common.jobspec import DistillationJob


def without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


def as_yaml(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)


def resubmittable_yaml(document: dict[str, Any]) -> str:
    """The YAML of `document` to edit and submit again."""
    shorter = without_nulls(document)
    try:
        same = DistillationJob.model_validate(shorter) == DistillationJob.model_validate(document)
    except ValidationError:
        same = False
    return as_yaml(shorter if same else document)
