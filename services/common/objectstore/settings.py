"""Where datasets and artifacts live: the `object_store` section that every service reading or writing
data carries."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from stillhouse.common.paths import stillhouse_home


class ObjectStoreSettings(BaseModel):
    """Where datasets and artifacts live: a local folder (embedded default) or an S3 API (MinIO, AWS...)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "s3"] = "local"
    bucket: str = Field(default="stillhouse", min_length=3, max_length=63)
    local_root: Path = Field(
        default_factory=lambda: stillhouse_home() / "objects",
        description="For `local`: the folder that holds the bucket folder.",
    )
    endpoint: str | None = Field(default=None, description="For `s3`: host:port of the S3 API.")
    secure: bool = Field(default=False, description="For `s3`: use HTTPS.")
    public_endpoint: str | None = Field(
        default=None,
        max_length=512,
        description="For `s3`: the URL (http or https, host, optional port) at which users reach the "
        "same S3 API from outside the cluster, e.g. https://minio.example.com. Presigned URLs are signed "
        "for this host (a signature covers the host); unset, for `endpoint`.",
    )
    region: str | None = None
    credentials: Literal["keys", "environment"] = Field(
        default="keys",
        description="For `s3`: `keys`, the access_key and secret_key here; `environment`, the process's "
        "own: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, else a web identity (IRSA on EKS: "
        "AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE), else the instance's role.",
    )
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    # Multipart uploads: size of one part and how many parts go up at once.
    part_size_mb: int = Field(default=16, ge=5, le=5120)
    parallel_uploads: int = Field(default=4, ge=1, le=64)

    @field_validator("public_endpoint")
    @classmethod
    def _public_endpoint_is_a_base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        check_public_endpoint(value)
        return value.rstrip("/")

    @model_validator(mode="after")
    def _s3_needs_endpoint_and_keys(self) -> ObjectStoreSettings:
        if self.backend == "s3":
            needed = ("endpoint", "access_key", "secret_key") if self.credentials == "keys" else ("endpoint",)
            missing = [name for name in needed if getattr(self, name) is None]
            if self.credentials == "environment" and (self.access_key or self.secret_key):
                raise ValueError("object_store credentials `environment` takes no access_key or secret_key")
            if missing:
                raise ValueError(f"the s3 backend needs {', '.join(missing)}")
        elif self.public_endpoint is not None:
            raise ValueError("object_store.public_endpoint is for the s3 backend only")
        return self


def check_public_endpoint(url: str) -> tuple[str, bool]:
    """`host[:port]` and whether HTTPS, of a public endpoint URL; ValueError naming the setting and what is
    allowed when it is anything more than scheme, host and port."""
    allowed = (
        "object_store.public_endpoint must be http:// or https:// with a host and an optional port, and "
        "nothing else (no path, query, fragment or credentials), such as https://minio.example.com"
    )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"{allowed}; got {url!r}") from None
    extras = parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc
    if parts.scheme not in ("http", "https") or not parts.hostname or extras or any(c.isspace() for c in url):
        raise ValueError(f"{allowed}; got {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return (f"{host}:{port}" if port is not None else host), parts.scheme == "https"
