"""Real SSH nodes on this machine: what a fake provider rents is a mount namespace with its own sshd.

A node is `unshare -m` (a private mount namespace) in which:
- `/etc` is the node's own copy (passwd with an `sshd` user, the sshd config and host key, and whatever
  SkyPilot's root set-up rewrites: `/etc/security`, `/etc/systemd/system.conf`, `/etc/ssh/sshd_config`);
- `/root` (the SSH user's home) is the node's folder, so SkyPilot's runtime lands at the same absolute
  paths on every node (`/root/skypilot-runtime`) and never in this machine's home;
- `/run` is a tmpfs holding sshd's privilege-separation directory;
- a Python 3.10 install that lives under the host's `/root` (pyenv) is bound back read-only, so uv finds
  the interpreter SkyPilot's runtime asks for without downloading one.
Its sshd (Debian's `openssh-server`, unpacked into `<repo>/.cache/openssh` when the system has none: nothing
is installed system-wide) listens on 127.0.0.1 on a free port. Everything else (network, /tmp, /usr, the
project's venv) is this machine's: the node reaches the test's S3 server on 127.0.0.1 as a rented machine
reaches its bucket.

Stopping a node kills (SIGKILL) every process in its mount namespace that carries its id in its
environment (sshd passes `MEETARA_NODE_ID` to every session): a namespace's inode number is reused once the
namespace is gone, so the inode alone never names a node. Nodes are listed in a registry file (id, sshd
pid and start time, namespace) so that a test's teardown stops every node a fake provider started.

Standard library only: the fake providers (a mitmproxy addon, in mitmproxy's own venv) import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OPENSSH_CACHE = REPO / ".cache" / "openssh"
OPENSSH_PACKAGES = ("openssh-server", "openssh-sftp-server", "libwrap0")
NODE_ENV = "MEETARA_NODE_ID"
# what a snapshot keeps of a node's home: SkyPilot's runtime venv and the files its set-up checks to skip
# reinstalling (the wheel hash, the recorded python and ray paths), uv itself
IMAGE_PATHS = ("skypilot-runtime", ".sky/wheels", ".sky/python_path", ".sky/ray_path", ".local/bin/uv")
# ports SkyPilot's runtime takes on a node (ray head, dashboard, object manager; the skylet): a node's sshd
# never takes them, and a test must not give meetara's SkyPilot API server the skylet's
RESERVED_PORTS = frozenset({6380, 8266, 8076, 46590})


class NodeError(RuntimeError):
    """A node could not be made or started; the message says why."""


@dataclass(frozen=True)
class OpenSSH:
    sshd: Path
    sftp_server: Path
    lib_dir: Path | None  # LD_LIBRARY_PATH for an unpacked sshd (its libwrap)


def ensure_openssh(cache: Path = OPENSSH_CACHE) -> OpenSSH:
    """This machine's sshd if installed, else Debian's packages unpacked into `cache` (once; locked)."""
    system = Path("/usr/sbin/sshd")
    if system.exists() and Path("/usr/lib/openssh/sftp-server").exists():
        return OpenSSH(system, Path("/usr/lib/openssh/sftp-server"), None)
    root, marker = cache / "root", cache / ".unpacked"
    found = OpenSSH(
        root / "usr/sbin/sshd", root / "usr/lib/openssh/sftp-server", root / "usr/lib/x86_64-linux-gnu"
    )
    if marker.exists() and found.sshd.exists():
        return found
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and found.sshd.exists():
            return found
        debs = cache / "debs"
        shutil.rmtree(debs, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        debs.mkdir()
        got = subprocess.run(
            ["apt-get", "download", *OPENSSH_PACKAGES], cwd=debs, capture_output=True, text=True, timeout=300
        )
        if got.returncode != 0:
            raise NodeError(
                f"apt-get download {' '.join(OPENSSH_PACKAGES)} failed: {got.stderr.strip()[-500:]}"
            )
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True, timeout=120)
        if not found.sshd.exists():
            raise NodeError(f"no sshd in the unpacked packages under {root}")
        marker.write_text("\n".join(OPENSSH_PACKAGES))
    return found


@dataclass(frozen=True)
class Node:
    """A started node: its id, folder, SSH address, and the sshd that keeps its namespace."""

    id: str
    root: Path  # the node's folder; its `home` is the node's /root
    host: str
    port: int
    pid: int  # sshd (the namespace's first process)
    started: int  # sshd's start time (clock ticks since boot, /proc/PID/stat field 22)
    namespace: str  # "mnt:[inode]"
    user: str = "root"

    @property
    def home(self) -> Path:
        return self.root / "home"

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "root": str(self.root)})

    @classmethod
    def from_json(cls, text: str) -> Node:
        d = json.loads(text)
        return cls(**{**d, "root": Path(d["root"])})


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in () may hold spaces
    return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie is gone; field 22: start time


def _namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _has_id(pid: int, node_id: str) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{NODE_ENV}={node_id}".encode() in env.split(b"\0")


def free_port(host: str = "127.0.0.1") -> int:
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def _python310() -> Path | None:
    """A Python 3.10 install prefix (SkyPilot's runtime venv asks uv for 3.10), or None."""
    found = shutil.which("python3.10")
    candidates = [Path(found).resolve()] if found else []
    candidates += sorted(Path("/root/.pyenv/versions").glob("3.10*/bin/python3.10"))
    for exe in candidates:
        real = exe.resolve()
        if real.exists() and "shims" not in real.parts:
            return real.parents[1]
    return None


def _under_root(py310: Path | None, user_env: Path | None) -> list[Path]:
    """What the node needs from this machine's /root (which the node's home hides): the Python 3.10 install,
    the user env and the interpreter its venv was made from (pyvenv.cfg's `home`), outermost only."""
    wanted: list[Path] = [p for p in (py310, user_env) if p is not None]
    cfg = user_env / "pyvenv.cfg" if user_env is not None else None
    if cfg is not None and cfg.exists():
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                wanted.append(Path(value.strip()).resolve().parent)  # .../bin -> the install's prefix
    inside = sorted(
        {p.resolve() for p in wanted if p.resolve().is_relative_to("/root")}, key=lambda p: len(p.parts)
    )
    outer: list[Path] = []
    for p in inside:
        if not any(p.is_relative_to(o) for o in outer):
            outer.append(p)
    return outer


_SUDO = (
    "#!/bin/sh\n# a node is root already: run the command as asked\n"
    'while [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n'
)
_SYSTEMCTL = "#!/bin/sh\n# no systemd on a node: nothing to reload or restart\nexit 0\n"


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def start(
    root: Path,
    node_id: str,
    *,
    onstart: str | None = None,
    authorized_key: str | None = None,
    user: str = "root",
    host: str = "127.0.0.1",
    port: int | None = None,
    user_env: Path | None = None,
    image: Path | None = None,
    env: dict[str, str] | None = None,
    uv: Path | None = None,
    registry: Path | None = None,
    timeout: float = 30.0,
) -> Node:
    """Make and start a node in `root` (a fresh folder); return once its sshd answers with a banner.

    `onstart` runs as the provider's start script (as root, in the node, before sshd: Vast's `onstart`
    writes SkyPilot's key); `authorized_key` is a key installed directly (a provider that takes keys by
    API). `user` is the SSH user (uid 0: Lambda's `ubuntu`). `user_env` becomes `~/sky-user-env` (a venv
    with the training dependencies: the task's setup then installs nothing). `image` is a folder copied
    into the node's home first (a snapshot, `snapshot()`: a provider image with SkyPilot's runtime baked
    in). `env` is set in every SSH session. The node is appended to `registry`.
    """
    ssh = ensure_openssh()
    root = root.resolve()
    if root.exists() and any(root.iterdir()):
        raise NodeError(f"node folder {root} is not empty")
    home, etc, bin_dir = root / "home", root / "etc", root / "bin"
    home.mkdir(parents=True)
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
    if image is not None and image.exists():
        subprocess.run(["cp", "-a", f"{image}/.", str(home)], check=True, timeout=300)
    passwd = (etc / "passwd").read_text()
    if not any(line.startswith("sshd:") for line in passwd.splitlines()):
        passwd += "sshd:x:74:65534:sshd privsep:/run/sshd:/usr/sbin/nologin\n"
    if user != "root" and not any(line.startswith(f"{user}:") for line in passwd.splitlines()):
        passwd += f"{user}:x:0:0:{user}:/root:/bin/bash\n"
    (etc / "passwd").write_text(passwd)
    (etc / "systemd").mkdir(exist_ok=True)
    (etc / "systemd" / "system.conf").touch()
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(etc / "ssh" / "ssh_host_ed25519_key")]
    (etc / "ssh").mkdir(exist_ok=True)
    subprocess.run(keygen, check=True, capture_output=True, timeout=30)

    _write(bin_dir / "sudo", _SUDO, 0o755)
    _write(bin_dir / "systemctl", _SYSTEMCTL, 0o755)
    py310 = _python310()
    if py310 is not None:
        (bin_dir / "python3.10").symlink_to(py310 / "bin" / "python3.10")
    uv = uv or (Path(shutil.which("uv")) if shutil.which("uv") else None)
    if uv is not None and not (home / ".local/bin/uv").exists():
        (home / ".local/bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(uv, home / ".local/bin/uv")
    if user_env is not None:
        (home / "sky-user-env").symlink_to(user_env)
    path = f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    session_env = {"PATH": path, NODE_ENV: node_id, **(env or {})}
    # Debian's /etc/profile resets root's PATH in a login shell (SkyPilot runs its commands under one)
    _write(home / ".bash_profile", f"export PATH={shlex.quote(path)}\n[ -f ~/.bashrc ] && . ~/.bashrc\n")
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    if authorized_key:
        _write(ssh_dir / "authorized_keys", authorized_key.strip() + "\n", 0o600)

    port = port or free_port(host)
    set_env = " ".join(f"{k}={shlex.quote(v)}" for k, v in session_env.items())
    _write(
        etc / "ssh" / "sshd_config",
        f"Port {port}\nListenAddress {host}\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nAuthorizedKeysFile .ssh/authorized_keys\nUsePAM no\nStrictModes no\n"
        "MaxSessions 100\nMaxStartups 100\nAllowTcpForwarding yes\nPrintMotd no\nLogLevel INFO\n"
        f"SetEnv {set_env}\nSubsystem sftp {ssh.sftp_server}\n",
    )

    binds = []  # (source on this machine, folder in the node) bound before /root is replaced
    for keep in _under_root(py310, user_env):
        inside = home / keep.relative_to("/root")
        inside.mkdir(parents=True, exist_ok=True)
        binds.append((keep, inside))
    lines = [
        "set -eu",
        f"mount --bind {shlex.quote(str(etc))} /etc",
        "mount -t tmpfs -o mode=0755 tmpfs /run",
        "mkdir -p -m 0755 /run/sshd",
    ]
    for src, dst in binds:
        lines += [f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(dst))}",
                  f"mount -o remount,bind,ro {shlex.quote(str(dst))}"]  # fmt: skip
    lines.append(f"mount --rbind {shlex.quote(str(home))} /root")
    if onstart:
        _write(root / "onstart.sh", onstart)
        lines.append(
            f"(cd /root && HOME=/root bash {shlex.quote(str(root / 'onstart.sh'))}) > {root}/onstart.log 2>&1"
        )
    sshd_cmd = [str(ssh.sshd), "-D", "-e", "-f", "/etc/ssh/sshd_config"]
    lines.append(f"exec {shlex.join(sshd_cmd)}")
    _write(root / "init.sh", "\n".join(lines) + "\n", 0o755)

    proc_env = {
        "PATH": path,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        NODE_ENV: node_id,
        **({"LD_LIBRARY_PATH": str(ssh.lib_dir)} if ssh.lib_dir else {}),
    }
    with open(root / "sshd.log", "ab") as log:
        proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "bash", str(root / "init.sh")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=proc_env,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not _banner(host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(OSError):
                proc.kill()
            tail = (root / "sshd.log").read_text(errors="replace")[-1500:]
            raise NodeError(f"node {node_id}'s sshd did not answer on {host}:{port}: {tail}")
        time.sleep(0.05)
    started, ns = _start_time(proc.pid), _namespace(proc.pid)
    if started is None or ns is None:
        raise NodeError(f"node {node_id}'s sshd (pid {proc.pid}) is gone")
    node = Node(node_id, root, host, port, proc.pid, started, ns, user)
    if registry is not None:
        with open(registry, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(node.to_json() + "\n")
    return node


def _banner(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def processes(node: Node) -> list[int]:
    """PIDs of the node's processes: in its mount namespace, which is surely the node's while its sshd
    lives (sshd overwrites its own environment with its process title); once sshd is gone, only those that
    carry the node's id (the namespace's inode may since belong to another)."""
    keeper = alive(node)
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            if pid != os.getpid() and _namespace(pid) == node.namespace and (keeper or _has_id(pid, node.id)):
                out.append(pid)
    return out


def alive(node: Node) -> bool:
    return _start_time(node.pid) == node.started


def stop(node: Node, timeout: float = 10.0) -> int:
    """SIGKILL every process of the node (the machine is gone at once, as in a preemption) until none is
    left; returns how many were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        pids = processes(node)
        if not pids:
            return len(killed)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        if time.monotonic() > deadline:
            raise NodeError(f"node {node.id}: processes {pids} survived SIGKILL")
        time.sleep(0.05)


def registered(registry: Path) -> list[Node]:
    if not registry.exists():
        return []
    return [Node.from_json(line) for line in registry.read_text().splitlines() if line.strip()]


def stop_all(registry: Path) -> int:
    """Stop every node the registry lists (a test's teardown); returns how many processes were killed."""
    return sum(stop(n) for n in registered(registry))


def snapshot(node: Node, image: Path) -> bool:
    """Copy what SkyPilot's runtime set-up left in the node's home (IMAGE_PATHS) into `image`, once: the
    next nodes start with it, as a provider image with SkyPilot's runtime installed. False if the node's
    set-up had not finished (no ray path recorded) or the image exists."""
    marker = image / ".snapshot"
    if marker.exists() or not (node.home / ".sky" / "ray_path").exists():
        return False
    tmp = image.with_name(image.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in IMAGE_PATHS:
        src = node.home / rel
        if src.exists():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", str(src), str(tmp / rel)], check=True, timeout=300)
    (tmp / ".snapshot").write_text(node.id)
    with contextlib.suppress(OSError):
        tmp.rename(image)
    return marker.exists()


_LOG_TIME = re.compile(r"^[ID] (\d\d-\d\d \d\d:\d\d:\d\d\.\d+) PID=\d+ ")


def provision_stages(log: Path) -> dict[str, float]:
    """Seconds per stage of SkyPilot's provisioning of a node, from its provision.log: create -> SSH ready,
    file mounts, runtime set-up, ray, skylet (what bench/RESULTS.md records)."""
    marks: dict[str, float] = {}
    year = time.gmtime().tm_year
    for line in log.read_text(errors="replace").splitlines():
        m = _LOG_TIME.match(line)
        if m is None:
            continue
        t = time.mktime(time.strptime(f"{year}-{m.group(1)[:14]}", "%Y-%m-%d %H:%M:%S")) + float(
            "0" + m.group(1)[14:]
        )
        for key, needle in (
            ("created", "Launched instance"),
            ("ssh_ready", "SSH Connection ready"),
            ("mounts_start", "Start: internal_file_mounts"),
            ("mounts_end", "End:   internal_file_mounts"),
            ("runtime_start", "Start: setup_runtime_on_cluster"),
            ("runtime_end", "End:   setup_runtime_on_cluster"),
            ("ray_start", "Start: start_ray_on_head_node"),
            ("ray_end", "End:   start_ray_on_head_node"),
            ("skylet_start", "Start: start_skylet_on_head_node"),
            ("skylet_end", "End:   start_skylet_on_head_node"),
        ):
            if needle in line and key not in marks:
                marks[key] = t
    spans = {
        "create_to_ssh": ("created", "ssh_ready"),
        "file_mounts": ("mounts_start", "mounts_end"),
        "runtime_setup": ("runtime_start", "runtime_end"),
        "ray_start": ("ray_start", "ray_end"),
        "skylet_start": ("skylet_start", "skylet_end"),
        "create_to_skylet": ("created", "skylet_end"),
    }
    return {k: round(marks[b] - marks[a], 1) for k, (a, b) in spans.items() if a in marks and b in marks}
