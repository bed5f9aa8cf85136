"""Where a job may read local files from: the platform's input roots, and nowhere else.

A spec comes from any holder of an API token, and the services read its files with their own rights, so
a local path in a spec is a request to read the server's files. In embedded mode a local prompt source
or slot file must lie inside one of the configured roots (`stillhouse run` adds the spec's own folder,
`stillhouse up` the folders given with `--input-root` and `$STILLHOUSE_HOME/inputs`); on a cluster none
is configured and inputs come from object storage (`s3://`) only.

The path is resolved first (symbolic links and `..` followed), so neither can lead out of a root. A
refusal names the input and the rule, never anything read from the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stillhouse.common.field_refusals import FieldRefused
from stillhouse.common.jobspec import PromptsSpec
from stillhouse.common.objectstore.objects import S3_SCHEME


class InputRefused(FieldRefused):
    """A local input outside the input roots; `field` is where the spec names it."""


@dataclass(frozen=True)
class InputRoots:
    folders: tuple[Path, ...] = ()

    @classmethod
    def of(cls, folders: Iterable[Path | str]) -> InputRoots:
        return cls(tuple(Path(os.path.realpath(Path(folder).expanduser())) for folder in folders))

    def confine(self, path: str, field: str) -> Path:
        """The resolved local file `path` names, if it lies inside a root; else `InputRefused`."""
        if not self.folders:
            raise InputRefused(
                field,
                "this platform reads no local files (it has no input roots): give an s3:// object of "
                "its bucket",
            )
        if not path.startswith("/"):
            raise InputRefused(
                field,
                f"{path!r} is not an absolute path (the CLI makes paths relative to the spec absolute)",
            )
        resolved = Path(os.path.realpath(path))
        if not any(resolved.is_relative_to(folder) for folder in self.folders):
            listed = ", ".join(str(folder) for folder in self.folders)
            raise InputRefused(field, f"{path!r} is outside the input roots ({listed})")
        return resolved


NO_LOCAL_FILES = InputRoots()


def is_local(path: str) -> bool:
    return not path.startswith(S3_SCHEME)


def local_prompt_inputs(prompts: PromptsSpec) -> list[tuple[str, str]]:
    """(field, path) of every local file the prompts stage would read, named as the spec's fields are."""
    inputs = [
        (f"spec.prompts.sources[{index}].path", source.path)
        for index, source in enumerate(prompts.sources)
        if source.path is not None and is_local(source.path)
    ]
    inputs += [
        (f"spec.prompts.generate.slotFiles.{slot}", path)
        for slot, path in prompts.generate.slot_files.items()
        if is_local(path)
    ]
    return inputs


def check_prompt_inputs(prompts: PromptsSpec, roots: InputRoots) -> None:
    """Refuse the first local prompt input outside the roots."""
    for field, path in local_prompt_inputs(prompts):
        roots.confine(path, field)
