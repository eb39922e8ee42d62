"""serve.py started as its users start it, for the tests and the benchmarks that ask it over HTTP: a process on a free
port, in a session of its own (so that it and the workers it starts can be killed together), ready once /health
answers."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start(ckpt: Path, *args: str, **popen) -> tuple[subprocess.Popen, int]:
    """serve.py --ckpt_path ckpt on a free port, and that port; popen: subprocess.Popen's other arguments."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, str(ROOT / "serve.py"), "--ckpt_path", str(ckpt), "--port", str(port), *args]
    return subprocess.Popen(command, cwd=ROOT, start_new_session=True, **popen), port


def wait_until_ready(server: subprocess.Popen, port: int, seconds: float = 300) -> None:
    """Returns once the server's /health answers "ok"; raises if it ends or does not answer within seconds."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.read() == b"ok":
                    return
        except OSError:
            pass
        if server.poll() is not None:
            output = server.stdout.read() if server.stdout else ""
            raise RuntimeError(f"serve.py ended with exit status {server.returncode} before it was ready: {output}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"serve.py did not answer /health within {seconds:.0f} s")
        time.sleep(0.2)
