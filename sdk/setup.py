"""Build hook of the client-only SDK: assemble `specialist_router_client` from the repository's own files.

From a checkout (`pip install ./sdk`, `pip wheel ./sdk`), every build regenerates `sdk/src/specialist_router_client/`:
- `client.py`, `client_types.py`: copies of `router/client.py`, `router/client_types.py` whose `from router...`
  imports point at this package instead (the code is otherwise byte for byte the same);
- `v1/router_pb2*.py(i)`: generated from `proto/router/v1/router.proto`, as the full package's setup.py does, with
  the same descriptor file name (`router/v1/router.proto`): the wire names (`router.v1.RouterService`) and the
  descriptor are identical, so both packages can be imported in one process.
The build fails, naming the import, if the copied modules import anything but the standard library, grpc,
protobuf and this package (the SDK must stay installable without the gateway's dependencies). From an sdist (no
checkout around it) the files already in `src/` are used.
"""
from __future__ import annotations

import ast
import re
import shutil
import sys
import tempfile
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PKG = "specialist_router_client"
OUT = HERE / "src" / PKG
SOURCES = ("client.py", "client_types.py")
ALLOWED = {"__future__", "grpc", "google", PKG}

INIT = '''"""Client-only SDK of specialist-router (generated from router/client.py by sdk/setup.py; do not edit).

    from specialist_router_client import Client
    with Client("127.0.0.1:50051") as c:
        print(c.generate("Write a haiku about SQL", max_tokens=64).text)
"""
from specialist_router_client.client import *  # noqa: F401,F403
from specialist_router_client.client import __all__  # noqa: F401

__version__ = "{version}"
'''


def _point_imports_here(text: str, *, stub: bool = False) -> str:
    """`from router... import` / `import router.v1...` -> this package (import lines only; strings untouched)."""
    text = re.sub(r"^(\s*)from router((?:\.\w+)*) import ", rf"\1from {PKG}\2 import ", text, flags=re.M)
    text = re.sub(r"^(\s*)import router\.v1\.(\w+)", rf"\1import {PKG}.v1.\2", text, flags=re.M)
    if stub:  # mypy stubs spell types as router.v1.router_pb2.X
        text = re.sub(r"(?<![\w.'\"/])router\.v1\.(router_pb2\w*)\b", rf"{PKG}.v1.\1", text)
    return text


def _check_imports(path: Path) -> None:
    stdlib = set(sys.stdlib_module_names)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        for name in names:
            top = name.split(".")[0]
            if top not in stdlib and top not in ALLOWED:
                raise SystemExit(f"sdk/setup.py: {path.name} imports {name!r}; the client-only SDK ships only grpc, "
                                 f"protobuf and {PKG} (keep router/client.py free of other imports)")


def _version() -> str:
    m = re.search(r'^__version__ = "([^"]+)"', (REPO / "router" / "__init__.py").read_text(), re.M)
    if not m:
        raise SystemExit("sdk/setup.py: no __version__ in router/__init__.py")
    return m.group(1)


def _generate_stubs(dest: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc  # build requirement (pyproject [build-system])

    proto_root = REPO / "proto"
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    plugins = []
    for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):  # from mypy-protobuf, next to this interpreter
        exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
        if exe:
            plugins.append(f"--plugin={name}={exe}")
    with tempfile.TemporaryDirectory() as tmp:
        outs = [f"--python_out={tmp}", f"--grpc_python_out={tmp}"]
        if len(plugins) == 2:
            outs += [f"--mypy_out={tmp}", f"--mypy_grpc_out={tmp}"]
        if protoc.main(["protoc", *plugins, f"-I{proto_root}", f"-I{include}", *outs, "router/v1/router.proto"]) != 0:
            raise SystemExit("sdk/setup.py: protoc failed to generate the router.v1 stubs from proto/")
        for f in sorted((Path(tmp) / "router" / "v1").glob("router_pb2*")):
            text = _point_imports_here(f.read_text(), stub=f.suffix == ".pyi")
            text = text.replace("'router.v1.router_pb2'", f"'{PKG}.v1.router_pb2'")  # the Python module's name
            (dest / f.name).write_text(text)


def _requirements() -> list[str]:
    """grpcio / protobuf no older than the generated stubs check for at import."""
    grpc_file = (OUT / "v1" / "router_pb2_grpc.py").read_text()
    pb_file = (OUT / "v1" / "router_pb2.py").read_text()
    grpc_v = re.search(r"^GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_file, re.M)
    pb_v = re.search(r"^# Protobuf Python Version: ([\d.]+)", pb_file, re.M)
    reqs = [f"grpcio>={grpc_v.group(1)}" if grpc_v else "grpcio>=1.60"]
    if pb_v:
        major = int(pb_v.group(1).split(".")[0])
        reqs.append(f"protobuf>={pb_v.group(1)},<{major + 1}")
    else:
        reqs.append("protobuf>=5")
    return reqs


def assemble() -> str:
    """Regenerate src/specialist_router_client from the checkout; returns the version."""
    version = _version()
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "v1").mkdir(parents=True)
    for name in SOURCES:
        (OUT / name).write_text(_point_imports_here((REPO / "router" / name).read_text()))
    (OUT / "__init__.py").write_text(INIT.format(version=version))
    (OUT / "v1" / "__init__.py").write_text('"""Generated gRPC stubs of the router.v1 API (do not edit)."""\n')
    (OUT / "py.typed").write_text("")
    _generate_stubs(OUT / "v1")
    for f in [*OUT.glob("*.py"), *(OUT / "v1").glob("*.py")]:
        _check_imports(f)
    return version


if (REPO / "router" / "client.py").is_file() and (REPO / "proto" / "router" / "v1" / "router.proto").is_file():
    VERSION = assemble()
elif (OUT / "client.py").is_file():  # an sdist: assembled when it was made
    VERSION = re.search(r'^__version__ = "([^"]+)"', (OUT / "__init__.py").read_text(), re.M).group(1)
else:
    raise SystemExit("sdk/setup.py: build it from a checkout of specialist-router (needs ../router/client.py and "
                     "../proto), e.g. `pip install ./sdk` from the repository root")

setup(
    version=VERSION,
    install_requires=_requirements(),
    package_dir={"": "src"},
    packages=[PKG, f"{PKG}.v1"],
    package_data={PKG: ["py.typed", "*.pyi"], f"{PKG}.v1": ["*.pyi"]},
    include_package_data=False,
)
