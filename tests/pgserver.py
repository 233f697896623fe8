"""A throwaway PostgreSQL server for the multi-worker tests and ``make bench-workers``.

Debian's ``postgresql`` package (``make test`` installs it) provides the binaries; the cluster
lives in its own temporary folder with trust authentication on 127.0.0.1 and a free port, and
is stopped and deleted on exit. Run as root, the server runs as Debian's ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def pg_bin() -> Path | None:
    """The directory of Debian's PostgreSQL server binaries (initdb, pg_ctl), if installed."""
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


@contextlib.contextmanager
def throwaway_postgres(*, fsync: bool = False) -> Iterator[Callable[[], str]]:
    """Start a cluster; yield a function that creates a fresh database and returns its URL
    (``postgresql+psycopg://autoslim@127.0.0.1:PORT/NAME``). ``fsync``: durable commits as
    a production server makes them (off for tests: faster, and nothing there must survive)."""
    bin_dir = pg_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries not found: sudo apt-get install postgresql")
    # not under pytest's 0700 temp root: the server's own user must reach its folder
    base = Path(tempfile.mkdtemp(prefix="autoslim-pg-"))
    data = base / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        uid = pwd.getpwnam("postgres")
        os.chown(base, uid.pw_uid, uid.pw_gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = {"check": True, "capture_output": True, "text": True}
    subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "autoslim", "-A", "trust"],
        **run,
    )
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync={'on' if fsync else 'off'}"
    subprocess.run(
        [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts]
        + ["-l", str(base / "server.log"), "-w", "-t", "60", "start"],
        **run,
    )
    n = {"db": 0}

    def new_database() -> str:
        import psycopg

        n["db"] += 1
        name = f"t{n['db']}_{os.getpid()}"
        with psycopg.connect(
            f"host=127.0.0.1 port={port} user=autoslim dbname=postgres", autocommit=True
        ) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://autoslim@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)
