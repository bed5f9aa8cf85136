"""Object-store keys on Ray: they reach training and evaluation through the environment of the Ray
nodes, never through a job. A job's runtime environment is shown by the Ray dashboard and kept in its
job table, so the run a job carries leaves the keys out; the entrypoint and the workers take them from
their own environment. The trainer's local Ray head is started with them (its workers inherit them); on
a cluster, the chart puts them into the head and worker pods from the object store's Secret.
"""

from __future__ import annotations

import json
import os
from typing import TypeVar

from pydantic import BaseModel

from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.trainer.failures import UserFixableError

ACCESS_KEY_ENV = "STILLHOUSE_OBJECT_STORE_ACCESS_KEY"
SECRET_KEY_ENV = "STILLHOUSE_OBJECT_STORE_SECRET_KEY"
KEY_FIELDS = {"access_key": ACCESS_KEY_ENV, "secret_key": SECRET_KEY_ENV}

Run = TypeVar("Run", bound=BaseModel)


class MissingObjectStoreKeys(UserFixableError):
    """A Ray node without the keys of the run's S3 store."""


def key_environment(store: ObjectStoreSettings) -> dict[str, str]:
    """The variables that give a Ray node the keys of `store` (none for a store without keys)."""
    return {
        variable: secret.get_secret_value()
        for field, variable in KEY_FIELDS.items()
        if (secret := getattr(store, field)) is not None
    }


def run_without_keys(run: BaseModel) -> str:
    """The run as JSON for a job, its `object_store` without keys."""
    document = run.model_dump(mode="json")
    for field in KEY_FIELDS:
        document["object_store"][field] = None
    return json.dumps(document)


def run_with_keys(model: type[Run], run_json: str) -> Run:
    """The run of a job, its object-store keys taken from this process's environment.

    MissingObjectStoreKeys, naming the variables, when an S3 store has no keys here."""
    document = json.loads(run_json)
    store = document["object_store"]
    if store.get("credentials") == "environment":  # the node's own (IRSA): nothing to pass on
        return model.model_validate(document)
    for field, variable in KEY_FIELDS.items():
        if store.get(field) is None and os.environ.get(variable):
            store[field] = os.environ[variable]
    if store.get("backend") == "s3" and not all(store.get(field) for field in KEY_FIELDS):
        raise MissingObjectStoreKeys(
            f"this Ray node has no object-store keys: set {ACCESS_KEY_ENV} and {SECRET_KEY_ENV} in the "
            "environment of every Ray node (the Helm chart does; a local head started by the trainer "
            "inherits them)"
        )
    return model.model_validate(document)
