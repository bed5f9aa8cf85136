"""Where the files of a model reference are on this machine: the one place a service turns a spec's model
reference into something `model_loading.resolve_model_reference` loads.

- ``s3://<bucket>/<prefix>``: the cached local copy (`weights_cache`), fetched with the platform's object
  store credentials (its settings, or the pod's environment such as IRSA), never any from the spec;
- an absolute path: the resolved path (symbolic links and ``..`` followed), which must lie under the
  models root when one is configured;
- ``<distribution>/<file>``: unchanged. With a models root, a relative reference names a distribution's
  file only, never a path relative to the service's working folder.

Refusals are `ModelReferenceRefused` naming the spec field.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from stillhouse.common.models.references import (
    ModelReferenceRefused,
    check_model_reference,
    is_s3_reference,
    parse_s3_reference,
)
from stillhouse.common.models.settings import ModelSettings
from stillhouse.common.models.weights_cache import S3ModelCache
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings

# (reference, spec field) -> what `model_loading.resolve_model_reference` loads: `ModelLocator.locate`.
Locate = Callable[[str, str], str]


class ModelLocator:
    def __init__(self, settings: ModelSettings, object_store: ObjectStoreSettings) -> None:
        self._root = Path(os.path.realpath(settings.root)) if settings.root is not None else None
        self._cache = S3ModelCache(
            settings, lambda bucket: open_object_store(object_store.model_copy(update={"bucket": bucket}))
        )

    def locate(self, reference: str, field: str, include: Callable[[str], bool] | None = None) -> str:
        """The reference as a local path (or distribution reference) to load; for an s3:// model, only
        the files `include` accepts are fetched (see `S3ModelCache.fetch`)."""
        check_model_reference(reference, field)
        if is_s3_reference(reference):
            return str(self._cache.fetch(parse_s3_reference(reference, field), field, include))
        if self._root is None:
            return reference
        if not reference.startswith("/"):
            if reference.startswith("~") or Path(reference).exists():
                raise ModelReferenceRefused(
                    field,
                    f"{reference!r} is a relative path: give an absolute path under {self._root}, an "
                    "s3://<bucket>/<prefix> model, or <distribution>/<file>",
                )
            return reference
        resolved = Path(os.path.realpath(reference))
        if not resolved.is_relative_to(self._root):
            raise ModelReferenceRefused(
                field,
                f"{reference!r} is outside the models root {self._root}: local models are read there only",
            )
        return str(resolved)
