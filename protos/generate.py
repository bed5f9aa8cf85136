"""Generate the Python gRPC stubs from protos/ into services/<service>/v1/.

    python protos/generate.py          # regenerate in place
    python protos/generate.py --check  # exit 1 if the committed stubs differ from fresh ones

The stubs are committed so that an installed package needs no code generator; `--check` keeps them honest.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTOS = REPO / "protos"
PACKAGE_DIR = REPO / "services"  # the import package `stillhouse`


def _include_dirs() -> list[Path]:
    well_known = Path(str(resources.files("grpc_tools") / "_proto"))
    # google/rpc/status.proto ships with googleapis-common-protos, beside its generated module.
    import google.rpc.status_pb2 as status_pb2

    googleapis = Path(status_pb2.__file__).parent.parent.parent
    return [PROTOS, well_known, googleapis]


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every .proto under protos/stillhouse; return the generated files, relative."""
    sources = sorted(PROTOS.glob("stillhouse/**/*.proto"))
    args = ["protoc", *(f"-I{path}" for path in _include_dirs())]
    args += [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += [str(source.relative_to(PROTOS)) for source in sources]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(path.relative_to(out_dir / "stillhouse") for path in out_dir.glob("stillhouse/**/*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generated = generate(fresh)
        committed = sorted(PACKAGE_DIR.glob("*/v1/*_pb2*.py*"))
        stale = {path.relative_to(PACKAGE_DIR) for path in committed} - set(generated)
        for relative in generated:
            source, target = fresh / "stillhouse" / relative, PACKAGE_DIR / relative
            if check:
                if not target.exists() or not filecmp.cmp(source, target, shallow=False):
                    stale.add(relative)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                (target.parent / "__init__.py").touch()
                shutil.copyfile(source, target)
        if check and stale:
            print("stale gRPC stubs (run `make protos`):", *sorted(map(str, stale)), sep="\n  ")
            return 1
        if not check:
            for relative in stale:
                (PACKAGE_DIR / relative).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
