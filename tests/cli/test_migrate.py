"""`stillhouse migrate`: the job store's schema brought to this release, again and again; a bad database
refused with a message naming it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from stillhouse.cli.main import app


def migrate(*args: str, **env: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["migrate", *args], env=env)
    return result.exit_code, result.stdout, result.stderr


def revision(database: Path) -> str:
    engine = create_engine(f"sqlite:///{database}")
    with engine.connect() as connection:
        found = connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    engine.dispose()
    return found


def test_migrates_the_database_of_the_flag_or_the_environment_idempotently(tmp_path: Path) -> None:
    flagged, from_environment = tmp_path / "flag.db", tmp_path / "environment.db"
    for _ in range(2):
        assert migrate("--database-url", f"sqlite:///{flagged}")[:2] == (
            0,
            "the job store's schema is up to date\n",
        )
    code, _, _ = migrate(STILLHOUSE_CONTROL_PLANE_DATABASE_URL=f"sqlite:///{from_environment}")
    assert code == 0
    assert revision(flagged) == revision(from_environment) == "0003"


def test_a_bad_database_url_is_refused_naming_the_flag(tmp_path: Path) -> None:
    code, _, stderr = migrate("--database-url", "mysql://db/stillhouse")
    assert code == 2
    assert stderr.startswith("--database-url: database URL scheme 'mysql' is not supported")


def test_an_unreachable_database_fails_with_the_cause() -> None:
    code, _, stderr = migrate("--database-url", "postgresql://nobody@127.0.0.1:1/stillhouse")
    assert code == 1
    assert stderr.startswith("cannot migrate the job store: OperationalError: ")
    assert "Traceback" not in stderr
