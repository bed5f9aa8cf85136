"""Who may call the API: bearer tokens mapped to principals (a name, a tenant, a role), and each tenant's
quotas.

The principals file (YAML, `principals_file`; a mounted Secret on a cluster) lists them:

    principals:
      - {name: alice, tenant: team-a, role: user, tokenSha256: 9f86d08...}   # sha256sum of the token
      - {name: ops, tenant: platform, role: admin, token: "a-long-random-token"}
    tenants:
      team-a: {maxConcurrentJobs: 4, maxTeacherSpendUsdPerDay: 100}

A principal gives its token's SHA-256 (`tokenSha256`, so the file need not hold the secret) or the
token itself. Tokens from `api_tokens` and `api_token_file` are admins of the tenant `default`. A
presented token is hashed and compared in constant time with every principal's digest.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from stillhouse.common.jobspec import KUBERNETES_NAME_PATTERN

DEFAULT_TENANT = "default"
PRINCIPAL_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._@-]{0,126}[A-Za-z0-9])?")
MAX_PRINCIPAL_LENGTH = 128
MIN_TOKEN_LENGTH = 16


def _tenant_name(value: str) -> str:
    if not KUBERNETES_NAME_PATTERN.fullmatch(value):
        raise ValueError(
            "a tenant is 1 to 63 lower-case letters, digits and '-', not starting or ending with '-'"
        )
    return value


def _principal_name(value: str) -> str:
    if not PRINCIPAL_PATTERN.fullmatch(value):
        raise ValueError(
            f"a principal name is 1 to {MAX_PRINCIPAL_LENGTH} letters, digits, '.', '_', '@' and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def _long_enough(value: SecretStr | None) -> SecretStr | None:
    if value is not None and len(value.get_secret_value()) < MIN_TOKEN_LENGTH:
        raise ValueError(f"a token must be at least {MIN_TOKEN_LENGTH} characters long")
    return value


TenantName = Annotated[str, AfterValidator(_tenant_name)]


class Role(StrEnum):
    ADMIN = "admin"  # every tenant's jobs, and the audit log
    USER = "user"  # its own tenant's jobs only


@dataclass(frozen=True)
class Principal:
    name: str
    tenant: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def sees(self, tenant: str) -> bool:
        """Whether this principal may see (and act on) a job of `tenant`."""
        return self.is_admin or tenant == self.tenant


class _FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class TenantQuota(_FileModel):
    """A tenant's limits; an absent limit is no limit."""

    max_concurrent_jobs: Annotated[int, Field(ge=1, le=100_000)] | None = Field(
        default=None, description="Jobs of the tenant not yet in a final phase; a submit beyond it is 429."
    )
    max_teacher_spend_usd_per_day: Annotated[float, Field(gt=0, le=1_000_000_000)] | None = Field(
        default=None,
        description="Teacher dollars per UTC day (see `quotas.py` for what is counted); jobs must then set "
        "`spec.teacher.budgetUSD`.",
    )


class PrincipalEntry(_FileModel):
    name: Annotated[str, AfterValidator(_principal_name)] = Field(
        description="Who, as the audit log and job owners show it."
    )
    tenant: TenantName
    role: Role
    token: Annotated[SecretStr | None, AfterValidator(_long_enough)] = None
    token_sha256: str | None = Field(default=None, description="Lower-case hex SHA-256 of the token.")

    @field_validator("token_sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lower-case hex digits (e.g. from `printf %s TOKEN | sha256sum`)")
        return value

    @model_validator(mode="after")
    def _one_token(self) -> PrincipalEntry:
        if (self.token is None) == (self.token_sha256 is None):
            raise ValueError("give exactly one of `token` and `tokenSha256`")
        return self

    def digest(self) -> str:
        if self.token_sha256 is not None:
            return self.token_sha256
        return token_sha256(self.token.get_secret_value())  # type: ignore[union-attr]


class PrincipalsFile(_FileModel):
    principals: list[PrincipalEntry] = Field(min_length=1)
    tenants: dict[TenantName, TenantQuota] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique(self) -> PrincipalsFile:
        names = [entry.name for entry in self.principals]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"principal names must be unique: {', '.join(twice)} appear more than once")
        digests = [entry.digest() for entry in self.principals]
        if len(set(digests)) != len(digests):
            # Which ones would tell a reader of the error something about the tokens: say only that.
            raise ValueError("two principals have the same token")
        return self


class PrincipalsFileError(ValueError):
    """The principals file is missing or invalid; the message names the file and the field."""


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_principals_file(path: Path) -> PrincipalsFile:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PrincipalsFileError(f"cannot read the principals file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PrincipalsFileError(f"the principals file {path} is not valid YAML: {exc}") from exc
    try:
        return PrincipalsFile.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(file)'}: "
            f"{error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors(include_url=False, include_input=False)
        )
        raise PrincipalsFileError(f"invalid principals file {path}: {problems}") from None


def legacy_admin(token: str) -> tuple[str, Principal]:
    """A token of `api_tokens`/`api_token_file`: an admin of the default tenant, named after a short
    prefix of the token's hash so the audit log tells two such tokens apart without showing either."""
    digest = token_sha256(token)
    return digest, Principal(name=f"token-{digest[:8]}", tenant=DEFAULT_TENANT, role=Role.ADMIN)


class AccessControl:
    """Authenticates bearer tokens and knows each tenant's quota."""

    def __init__(self, principals: list[tuple[str, Principal]], quotas: dict[str, TenantQuota]) -> None:
        if not principals:
            raise ValueError("no API token configured: the token file is empty")
        digests = [digest for digest, _ in principals]
        if len(set(digests)) != len(digests):
            raise ValueError("a token is configured twice (in the token settings and the principals file)")
        self._principals = [(bytes.fromhex(digest), principal) for digest, principal in principals]
        self._quotas = quotas

    @classmethod
    def of(cls, tokens: list[str], principals_file: PrincipalsFile | None) -> AccessControl:
        entries = [legacy_admin(token) for token in tokens]
        quotas: dict[str, TenantQuota] = {}
        if principals_file is not None:
            entries += [
                (entry.digest(), Principal(entry.name, entry.tenant, entry.role))
                for entry in principals_file.principals
            ]
            quotas = dict(principals_file.tenants)
        return cls(entries, quotas)

    def authenticate(self, token: str) -> Principal | None:
        given = hashlib.sha256(token.encode()).digest()
        found = None
        # Every digest is compared, so the time taken does not tell which principal was close.
        for digest, principal in self._principals:
            if secrets.compare_digest(given, digest):
                found = principal
        return found

    def quota(self, tenant: str) -> TenantQuota:
        return self._quotas.get(tenant) or TenantQuota()
