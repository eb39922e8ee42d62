"""Ranks that die: when one process of a multi-process run ends on its own (SIGKILL, the OOM killer, a crash, a node
gone), every other process ends within seconds, with one line that names the rank, how it ended and the checkpoint to
resume from, instead of a collective's traceback or, with NCCL, a wait until the collective time-out.

Each rank holds one TCP connection to rank 0 (its address goes out with a broadcast once the process group is up), and
a thread watches it: the kernel closes a dead process's sockets at once, and TCP keepalive notices a vanished host in
about 30 s. A rank that ends as agreed says "bye" first; a rank that ends alone after an error says so. This does not
depend on the collective backend noticing anything. Rank 0 reports the death of any other rank; rank 1 that of rank 0.
"""

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from tinygpt_pl.training.checkpoint import newest_intact_checkpoint

KEEPALIVE = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 4}  # a silent host is dead after 10 + 5 x 4 s
EXIT_CODE = 1


def keepalive(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE.items():
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    return sock


class PeerWatch(Callback):
    """Ends this process, with one line, as soon as a peer process of the run ends unannounced."""

    def __init__(self) -> None:
        self.peers: dict[socket.socket, tuple[int, int]] = {}  # connection -> (rank, pid) of the process at its end
        self.ended: set[socket.socket] = set()  # peers that said bye
        self.trainer: L.Trainer | None = None
        self.children: list = []  # the launcher's processes (Popen) on this node: their exit status can be read
        self.found = threading.Event()  # a peer died: the thread is ending this process
        self.lock = threading.Lock()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1 or self.peers:
            return
        self.trainer, self.rank = trainer, trainer.global_rank
        launcher_children = getattr(trainer.strategy.launcher, "procs", [])
        self.children = list(launcher_children)
        # Lightning's observer of these children SIGKILLs this process up to 5 s after one fails, which would cut the
        # line short; it stops once its list (the launcher's, no public switch) is empty: this watch takes over
        launcher_children.clear()
        listener = None
        address = [None]
        if self.rank == 0:
            listener = socket.create_server(("", 0), backlog=trainer.world_size)
            address = [(os.environ.get("MASTER_ADDR", "127.0.0.1"), listener.getsockname()[1])]
        dist.broadcast_object_list(address, src=0)
        if self.rank == 0:
            for _ in range(trainer.world_size - 1):
                conn, _ = listener.accept()
                rank, pid = map(int, conn.makefile().readline().split())
                self.peers[keepalive(conn)] = (rank, pid)
            listener.close()
        else:
            conn = keepalive(socket.create_connection(address[0]))
            conn.sendall(f"{self.rank} {os.getpid()}\n".encode())
            self.peers[conn] = (0, 0)
        threading.Thread(target=self._watch, name="peer-watch", daemon=True).start()

    def _watch(self) -> None:
        selector = selectors.DefaultSelector()
        for conn in self.peers:
            selector.register(conn, selectors.EVENT_READ)
        while selector.get_map():
            for key, _ in selector.select():
                conn = key.fileobj
                try:
                    data = conn.recv(4096).decode(errors="replace")
                except OSError:  # a reset, or keepalive's verdict on a silent host
                    data = ""
                if data.startswith("bye"):
                    self.ended.add(conn)
                if data and not data.startswith("error"):
                    continue
                selector.unregister(conn)
                if conn not in self.ended:
                    self._peer_died(conn, data[len("error") :].strip() if data else None)

    def _peer_died(self, conn: socket.socket, said: str | None) -> None:
        """Say which rank ended how (said: its own words, None if it died without any) and what to resume; end the
        processes this one started, and itself. Rank 0 tells the others to end quietly: it reports."""
        with self.lock:
            if self.found.is_set():
                return
            self.found.set()
        rank, pid = self.peers[conn]
        if self.rank == 0:
            self.leave("error")
            for child in self.children:
                if child.pid == pid:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.wait(timeout=2)  # its exit status says how it ended
        if self.rank == 0 or (self.rank == 1 and said is None):
            os.write(2, f"\n{self.summary(rank, pid, said)}\n".encode())
        self.kill_children()
        os._exit(EXIT_CODE)

    def kill_children(self) -> None:
        """The processes this one started (Lightning's launcher on a node's first process), which would wait for it
        in vain."""
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)

    def summary(self, rank: int, pid: int, said: str) -> str:
        step = self.trainer.global_step
        how = f"failed ({said})" if said else "died without a word (killed: SIGKILL, the OOM killer, or a crash)"
        for child in self.children:
            if child.pid == pid and child.returncode is not None:
                code = child.returncode
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        line = f"error: rank {rank} of {self.trainer.world_size} {how} at step {step}; the other processes ended: "
        callback = self.trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback and callback.dirpath else None
        intact = newest_intact_checkpoint(folder) if folder and folder.is_dir() else None
        if intact is None:
            return line + "no checkpoint was written: start the run again"
        path, saved = intact
        flag = "last" if path.name == "last.ckpt" else str(path)
        line += f"the newest intact checkpoint is {path} (step {saved}): "
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) < int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)):
            return line + "torchrun starts the workers again, which resume from last.ckpt"
        return line + f"resume with --ckpt_path {flag}"

    def leave(self, how: str = "bye") -> None:
        """Tell the peers this process ends: as agreed ("bye"), or alone after an error ("error ...")."""
        for conn in list(self.peers):
            try:
                conn.sendall(f"{how}\n".encode())
            except OSError:
                pass
            self.ended.add(conn)

    def wait_for_death(self, timeout: float) -> None:
        """After an error in a collective: if a peer died, the watching thread ends this process meanwhile."""
        if self.peers and self.found.wait(timeout):
            time.sleep(timeout)
