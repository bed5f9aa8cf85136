"""Fixtures shared by the whole suite: free ports, and real processes that are always cleaned up."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
import torch
import transformers
from background import stop_process
from psycopg import sql
from service_token import SERVICE_PREFIXES, SERVICE_TOKEN, TOKEN_FILE_VARIABLE
from sqlalchemy.engine import make_url
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from waiting import grpc_serving, http_ok, pick_free_port, wait_until

from stillhouse.common.models.model_loading import EMBEDDED_TEACHER, load_tokenizer, resolve_model_reference

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files marked `long` first, each in its own order. `make test` hands whole files to its workers
    in collection order, so the short ones are left to fill in at the end and the workers finish
    together."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(scope="session", autouse=True)
def service_token_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every service and control plane the tests start (and every settings object they build) reads the
    suite's service token: its file is in each one's STILLHOUSE_<SERVICE>_SERVICE_TOKEN_FILE."""
    path = tmp_path_factory.mktemp("service-token") / "service-token"
    path.write_text(SERVICE_TOKEN + "\n")
    path.chmod(0o600)
    with pytest.MonkeyPatch.context() as environment:
        for prefix in SERVICE_PREFIXES:
            environment.setenv(f"STILLHOUSE_{prefix}_SERVICE_TOKEN_FILE", str(path))
        environment.setenv(TOKEN_FILE_VARIABLE, str(path))
        yield path


@pytest.fixture(scope="session", autouse=True)
def suite_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Settings whose defaults live under $STILLHOUSE_HOME (the teacher cache, the local object store,
    the model cache) point into the suite's own folder, never into the user's ~/.stillhouse."""
    home = tmp_path_factory.mktemp("stillhouse-home")
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("STILLHOUSE_HOME", str(home))
        yield home


@dataclass
class Processes:
    """Child processes of one test; whatever is still running at teardown is killed."""

    log_dir: Path
    running: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            argv,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL: the process gets no chance to clean up, as in a crash or an OOM kill."""
        process = self.running.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop(self, name: str) -> int:
        process = self.running.pop(name)
        process.terminate()
        return process.wait(20)

    def stop_all(self) -> None:
        for name in list(self.running):
            stop_process(self.running.pop(name))


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    group = Processes(log_dir=tmp_path)
    yield group
    group.stop_all()


@pytest.fixture(scope="module")
def module_processes(
    tmp_path_factory: pytest.TempPathFactory, service_token_file: Path
) -> Iterator[Processes]:
    """Child processes shared by the tests of one module (logs in a folder of the module's own); whatever
    is still running when the module's last test has run is killed."""
    group = Processes(log_dir=tmp_path_factory.mktemp("module"))
    yield group
    group.stop_all()


def serve_argv(service: str, port: int) -> list[str]:
    return [sys.executable, "-m", "stillhouse.cli.main", "serve", service, "--port", str(port)]


# Test modules cannot import this file (it is not a package module), so helpers come as fixtures.
@pytest.fixture
def free_port() -> Callable[[], int]:
    return pick_free_port


@pytest.fixture(name="wait_until")
def wait_until_fixture():
    return wait_until


@dataclass
class ControlPlane:
    """A real control plane process (`stillhouse serve control-plane`) that a test can kill and restart."""

    processes: Processes
    home: Path
    port: int
    services: dict[str, str]
    token: str = "test-token-0123456789"
    extra_env: dict[str, str] = field(default_factory=dict)
    # The process's name among the test's processes (and of its log); two control planes need two.
    name: str = "control-plane"
    # The folder of local inputs it accepts (STILLHOUSE_CONTROL_PLANE_INPUT_ROOTS), where there is one.
    inputs: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.processes.log(self.name)

    def log_since(self, start: int) -> str:
        """What the process logged after the first `start` characters (`len(control_plane.log)` then)."""
        return self.log[start:]

    def start(self) -> None:
        token_file = self.home / "api-token"
        token_file.write_text(self.token + "\n")
        env = {
            "STILLHOUSE_HOME": str(self.home),
            "STILLHOUSE_CONTROL_PLANE_API_TOKEN_FILE": str(token_file),
            "STILLHOUSE_CONTROL_PLANE_DATABASE_URL": f"sqlite:///{self.home / 'stillhouse.db'}",
            "STILLHOUSE_CONTROL_PLANE_PROGRESS_EVENT_INTERVAL_SECONDS": "0.2",
            **{
                f"STILLHOUSE_CONTROL_PLANE_SERVICES__{name.upper()}": address
                for name, address in self.services.items()
            },
            **self.extra_env,
        }
        self.processes.start(self.name, serve_argv("control-plane", self.port), env)
        wait_until(lambda: http_ok(f"{self.url}/readyz"), 60, "the control plane to become ready")

    def kill(self) -> None:
        self.processes.kill(self.name)

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token or self.token}"}, timeout=10
        )


@pytest.fixture
def control_plane_at(processes: Processes, tmp_path: Path) -> Callable[..., ControlPlane]:
    """Make (not start) a control plane talking to the given stage service addresses."""

    def make(services: dict[str, str], **extra_env: str) -> ControlPlane:
        return ControlPlane(processes, tmp_path, pick_free_port(), services, extra_env=extra_env)

    return make


@pytest.fixture(scope="module")
def module_control_plane_at(module_processes: Processes) -> Callable[..., ControlPlane]:
    """As `control_plane_at`, for a control plane that the tests of a module share (among
    `module_processes`, its home their folder): one per module."""

    def make(services: dict[str, str], **extra_env: str) -> ControlPlane:
        return ControlPlane(
            module_processes, module_processes.log_dir, pick_free_port(), services, extra_env=extra_env
        )

    return make


@pytest.fixture
def grpc_ready() -> Callable[[str], bool]:
    return grpc_serving


SCRIPTED_STAGES = REPO / "tests" / "control_plane" / "scripted_stages.py"


def start_scripted_api(
    processes: Processes,
    root: Path,
    *,
    every_stage: bool = False,
    stage_seconds: float = 0,
    storage: str | None = None,
    failing_rpc: str | None = None,
    **extra_env: str,
) -> ControlPlane:
    """A control plane process (home `root`) whose stage services are scripted; see `start_api`."""
    scripted = f"127.0.0.1:{pick_free_port()}"
    argv = [sys.executable, str(SCRIPTED_STAGES), scripted.split(":")[1], str(root / "j")]
    processes.start("stages", [*argv, str(stage_seconds), *([failing_rpc] if failing_rpc else [])])
    wait_until(lambda: grpc_serving(scripted), 20, "the scripted stage services")
    services = {
        name: scripted if every_stage else f"127.0.0.1:{pick_free_port()}" for name in ("prompts", "teacher")
    }
    if storage is not None:
        services["storage"] = storage
    inputs = root / "inputs"
    inputs.mkdir()
    control_plane = ControlPlane(
        processes,
        root,
        pick_free_port(),
        {**services, "trainer": scripted},
        extra_env={"STILLHOUSE_CONTROL_PLANE_INPUT_ROOTS": json.dumps([str(inputs)]), **extra_env},
        inputs=inputs,
    )
    control_plane.start()
    return control_plane


@pytest.fixture
def start_api(processes, tmp_path):
    """Start a control plane process whose stage services are scripted; local inputs may come from
    `tmp_path/inputs` (its `inputs`). With `every_stage`, the scripted process serves Prompts and Teacher
    as well, so jobs and estimates run through, each stage taking `stage_seconds` (and reporting progress
    ten times); otherwise only the trainer (its submit-time check finds nothing) and jobs wait in Prompts,
    retrying. `storage` is the address of a real storage service to use instead of the scripted one. The
    `failing_rpc` (such as "TrainStudent") fails. `extra_env` goes to the control plane's environment."""

    def start(**options) -> ControlPlane:
        return start_scripted_api(processes, tmp_path, **options)

    return start


@pytest.fixture(scope="module")
def start_module_api(tmp_path_factory: pytest.TempPathFactory, service_token_file: Path):
    """`start_api` for a control plane that the tests of a module share, stopped after the module's last
    test: for tests that need no process of their own, each working on jobs, principals or files that no
    other test touches. Each call starts another, with a home (and `inputs`) of its own."""
    groups: list[Processes] = []

    def start(**options) -> ControlPlane:
        root = tmp_path_factory.mktemp("api")
        groups.append(Processes(log_dir=root))
        return start_scripted_api(groups[-1], root, **options)

    yield start
    for group in groups:
        group.stop_all()


# --- databases ------------------------------------------------------------------------------------

POSTGRES_ADMIN_URL = os.environ.get(
    "STILLHOUSE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def _libpq_url(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def _admin_connection() -> psycopg.Connection:
    try:
        return psycopg.connect(_libpq_url(POSTGRES_ADMIN_URL), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        problem = str(error).strip()
    where = make_url(POSTGRES_ADMIN_URL).render_as_string(hide_password=True)
    pytest.fail(
        f"PostgreSQL is not reachable at {where}: start it, or point STILLHOUSE_TEST_POSTGRES_URL "
        f"at a server where CREATE DATABASE is allowed ({problem})",
        pytrace=False,
    )


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards; yields its URL."""
    name = f"stillhouse_test_{secrets.token_hex(6)}"
    with _admin_connection() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _libpq_url(POSTGRES_ADMIN_URL, database=name)
    finally:
        with _admin_connection() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def postgres_database_url() -> Iterator[str]:
    """The URL of an empty PostgreSQL database of the test's own."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database, once on SQLite and once on PostgreSQL (every store supports both).

    PostgreSQL is not optional: a test that cannot reach it fails rather than skips, so a missing server
    never passes for a green run. STILLHOUSE_TEST_POSTGRES_URL points at another server (a database the
    user may connect to and run CREATE DATABASE from)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'databases' / 'test.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


# --- tiny models ----------------------------------------------------------------------------------

# The output layer of a tiny model is scaled up so that its distributions are peaked, as a trained
# model's are: a teacher then has something to teach, and greedy answers do not hinge on near-ties.
OUTPUT_LAYER_STD = 0.5


@pytest.fixture(scope="session")
def tokenizer_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer (49,152 tokens, with its chat template), saved as a Hugging Face tokenizer
    folder. Reading it from the GGUF file takes seconds, so the folder is kept in pytest's cache between
    runs (written to a temporary folder first and renamed, so that concurrent runs never see half of it)."""
    cache = getattr(request.config, "cache", None)  # None with `-p no:cacheprovider`
    cache_root = (
        cache.mkdir("stillhouse-trainer") if cache is not None else tmp_path_factory.mktemp("tokenizer")
    )
    folder = cache_root / f"smollm2-tokenizer-transformers-{transformers.__version__}"
    if not (folder / "tokenizer_config.json").is_file():
        staging = cache_root / f".{folder.name}.{uuid.uuid4().hex}"
        load_tokenizer(resolve_model_reference(EMBEDDED_TEACHER)).save_pretrained(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another run renamed its copy first
            shutil.rmtree(staging, ignore_errors=True)
    return folder


@pytest.fixture
def tiny_llama(tokenizer_dir: Path) -> Callable[..., Path]:
    """Factory: `tiny_llama(path, layers=2, hidden=64, seed=0) -> path`, a random LlamaForCausalLM over
    SmolLM2's vocabulary saved there with `save_pretrained`, SmolLM2's tokenizer beside it. Different
    seeds give different models (a teacher and a student that disagree)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def make(path: Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.lm_head.weight.normal_(0, OUTPUT_LAYER_STD)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return Path(path)

    return make


# A chat template of the shape instruct models use; tests vary it to make two templates differ.
CHAT_TEMPLATE = (
    "{% for message in messages %}<s> {{ message['role'] }} {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


@pytest.fixture
def tokenizer_only_model() -> Callable[..., Path]:
    """Factory: `tokenizer_only_model(path, words=32, extra=(), eos="</s>", chat_template=CHAT_TEMPLATE,
    context=512) -> path`, a folder with a word-level tokenizer (`<s>`, `</s>`, `<pad>`, `[UNK]`, then
    `w0`..`w{words-1}` and `extra`) and the config.json of a 2-layer Llama with an MLP 16 channels wide
    whose max_position_embeddings is `context`, but no weights: enough for whatever reads tokenizers and
    configs only. `chat_template` None leaves the tokenizer without one."""

    def make(
        path: Path,
        words: int = 32,
        extra: tuple[str, ...] = (),
        eos: str = "</s>",
        chat_template: str | None = CHAT_TEMPLATE,
        context: int = 512,
    ) -> Path:
        tokens = ["<s>", "</s>", "<pad>", "[UNK]", *(f"w{i}" for i in range(words)), *extra]
        backend = Tokenizer(
            WordLevel({token: index for index, token in enumerate(tokens)}, unk_token="[UNK]")
        )
        backend.pre_tokenizer = Whitespace()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<s>",
            eos_token=eos,
            pad_token="<pad>",
            unk_token="[UNK]",
            chat_template=chat_template,
        )
        tokenizer.save_pretrained(path)
        config = LlamaConfig(
            vocab_size=len(tokens),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=context,
        )
        config.save_pretrained(path)
        return Path(path)

    return make
