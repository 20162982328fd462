"""Build hook: generate the gRPC stubs (with mypy type stubs) from proto/ at build/install time.

Stubs are never hand-edited or committed; every `pip install` (regular or editable) regenerates them into
`router/v1/`, so `router.v1.router_pb2` always matches `proto/router/v1/router.proto`.
"""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _find_script(name: str) -> str | None:
    import shutil
    import sys
    import sysconfig

    for d in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        cand = Path(d) / name
        if cand.exists():
            return str(cand)
    return shutil.which(name)


def generate_stubs() -> None:
    import grpc_tools
    from grpc_tools import protoc  # build requirement (pyproject [build-system])

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    plugins = []
    for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):  # from mypy-protobuf, next to this interpreter
        exe = _find_script(name)
        if exe:
            plugins.append(f"--plugin={name}={exe}")
    args = ["protoc", *plugins, f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={ROOT}", f"--grpc_python_out={ROOT}",
            f"--mypy_out={ROOT}", f"--mypy_grpc_out={ROOT}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed to generate the router.v1 stubs from proto/")


generate_stubs()
setup()
