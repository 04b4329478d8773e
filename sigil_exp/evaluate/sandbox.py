"""Run untrusted programs (rustc on generated code, then the test binary) in a sandbox.

A session (`run_session`) runs commands one after another; each is its own process in its own
process group with its own wall-clock timeout, rlimits (`Limits`: CPU time, memory, processes,
file size, no core files), stdin from /dev/null, stdout/stderr to files outside the sandbox
(capped by RLIMIT_FSIZE; a test run's cut to its first and last 32 KiB), a scrubbed environment
with HOME and TMPDIR in its own directory, and nothing it started survives into the next
command. The launcher that does this (`_launch.py`) is a fresh single-threaded process per
session. On top of that, the strongest level this machine offers (chosen once by
`detect_sandbox`, recorded in the results):

- ``namespaces``: new mount, network, pid, ipc and uts namespaces (and a user namespace when
  not root), and an ipc namespace per command. Commands see a fresh root holding read-only
  /usr, /etc, /bin, /lib, the Rust toolchain (compile) or the test binary (run), an empty
  read-only /tmp and their own writable directory (a test run's: a fresh tmpfs of
  `Limits.disk_mb`): no home directories, no other samples, no host /tmp, no network (only a
  down loopback), no host processes. After each command every process left in the pid
  namespace is killed. As root, commands also drop to a uid of their own (one per concurrent
  slot), which makes RLIMIT_NPROC apply (root ignores it) without one slot's fork bomb
  starving another.
- ``rlimits``: the fallback when namespaces are not allowed (e.g. an unprivileged container):
  rlimits, the per-slot uid drop when root (rustc too, if that uid can run the toolchain; if not,
  `check_root_compile` refuses unless eval.sandbox_allow_root), and a kill of every process of
  that uid and every descendant after each command. No network, filesystem or IPC isolation;
  results record the level so they can be told apart.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sigil_exp.config import SigilError

LAUNCHER = str(Path(__file__).with_name("_launch.py"))
SYSTEM_RO = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc")
OUTPUT_READ_CAP = 64 * 1024  # bytes of a test run's stdout/stderr kept: the first and the last half
UID_BASE = 1_000_000_000  # per-slot uids: UID_BASE + (pid % 10**7) * 64 + slot (no passwd entry needed)
LEVELS = ("auto", "namespaces", "rlimits")


@dataclass(frozen=True)
class Limits:
    wall_s: float
    cpu_s: int  # CPU seconds, all threads together (SIGXCPU)
    nproc: int  # processes + threads (per sandbox uid, or per user namespace)
    fsize_mb: int  # largest file the program may write, including its captured stdout/stderr (SIGXFSZ)
    data_mb: int | None = None  # RLIMIT_DATA: heap and private writable mappings (thread stacks too), not reservations
    as_mb: int | None = None  # RLIMIT_AS: address space, reservations included (a loose backstop)
    disk_mb: int | None = None  # a fresh command's private dir: a tmpfs of this size, also on /tmp (namespaces)
    nofile: int = 256
    log_cap: int = 0  # keep only the first and last log_cap/2 bytes of stdout/stderr (0 = all)


def compile_limits(timeout_s: float) -> Limits:
    """rustc + the linker: more memory, threads and file size than a test run."""
    return Limits(wall_s=timeout_s, cpu_s=int(timeout_s * 4) + 5, nproc=256, fsize_mb=512, as_mb=8192, nofile=1024)


def run_limits(timeout_s: float, mem_mb: int = 4096, threads: int = 256, output_mb: int = 64, disk_mb: int = 256,
               cpu_s: float = 0.0) -> Limits:
    """A test run: memory counts what the program really maps for itself (RLIMIT_DATA), with the
    address space (which also counts malloc arenas and thread-stack reservations) only as a
    loose backstop. cpu_s=0: the wall-clock timeout + 1 s."""
    return Limits(wall_s=timeout_s, cpu_s=math.ceil(cpu_s or timeout_s + 1), nproc=threads, fsize_mb=output_mb,
                  data_mb=mem_mb, as_mb=2 * mem_mb + 4096, disk_mb=disk_mb, log_cap=OUTPUT_READ_CAP)


@dataclass(frozen=True)
class Sandbox:
    level: str  # namespaces | rlimits
    userns: bool = False  # namespaces without root: a user namespace owns the others
    drop_uid: bool = False  # root: run as a per-slot uid so RLIMIT_NPROC applies
    uid_base: int = 0
    ro: tuple[str, ...] = SYSTEM_RO  # host paths visible read-only inside `namespaces`
    python: str = sys.executable
    rustc_as_root: bool = False  # rlimits as root, and the sandbox uid cannot run the toolchain

    def describe(self) -> str:
        parts = [self.level + ("(user,mount,net,pid,ipc)" if self.userns else
                               "(mount,net,pid,ipc)" if self.level == "namespaces" else "")]
        if self.drop_uid:
            parts.append("uid-drop")
        if self.rustc_as_root:
            parts.append("rustc-as-root")
        if self.level != "rlimits":
            parts.append("rlimits")
        return "+".join(parts)

    def uid(self, slot: int) -> int | None:
        return self.uid_base + slot if self.drop_uid else None


@dataclass
class ProcResult:
    returncode: int  # 128+N when killed by signal N
    timed_out: bool
    stdout: str
    stderr: str
    wall_s: float
    stderr_full: str = field(default="", repr=False)  # uncapped (up to `full_stderr` bytes) when asked
    cpu_s: float = 0.0
    maxrss_mb: float = 0.0  # peak resident memory of the command's main process
    out_bytes: int = 0  # stdout/stderr sizes as written (before any cut)
    err_bytes: int = 0
    disk_full: bool = False  # its private tmpfs was full when it ended


class SandboxError(SigilError):
    pass


@dataclass(frozen=True)
class Toolchain:
    rustc: str  # the toolchain's real rustc (not the rustup proxy)
    clippy_driver: str | None
    sysroot: str


def find_toolchain() -> Toolchain:
    """The Rust toolchain, or a SigilError saying how to install it."""
    candidates = [shutil.which("rustc"), os.path.expanduser("~/.cargo/bin/rustc")]
    rustc = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if rustc is None:
        raise SigilError("rustc was not found on PATH or in ~/.cargo/bin; install Rust with "
                         "`curl --proto '=https' -sSf https://sh.rustup.rs | sh` (or `apt-get install rustc`) and retry.")
    try:
        sysroot = subprocess.run([rustc, "--print", "sysroot"], capture_output=True, text=True, check=True,
                                 timeout=60).stdout.strip()
    except (subprocess.SubprocessError, OSError) as e:
        raise SigilError(f"{rustc} --print sysroot failed ({e}); check the Rust install with `rustc -V`.") from None
    real = Path(sysroot) / "bin" / "rustc"
    clippy = Path(sysroot) / "bin" / "clippy-driver"
    if shutil.which("cc") is None:
        raise SigilError("rustc needs a C linker (`cc`) to build test binaries; install it with `apt-get install gcc`.")
    return Toolchain(rustc=str(real if real.is_file() else rustc),
                     clippy_driver=str(clippy) if clippy.is_file() else None, sysroot=sysroot)


def check_root_compile(sb: Sandbox, allow_root: bool) -> None:
    """Refuse to run rustc as root (`rlimits` level as root, toolchain unreadable for the
    sandbox uid) unless eval.sandbox_allow_root=true says so."""
    if sb.rustc_as_root and not allow_root:
        raise SigilError(
            "eval.sandbox=rlimits as root would run rustc as root (the sandbox uid cannot run the toolchain, "
            "e.g. under /root), so generated code could read root-only files at compile time; use "
            "eval.sandbox=namespaces (or auto where it works), install Rust where other users can read it, "
            "or set eval.sandbox_allow_root=true to accept it.")


@dataclass(frozen=True)
class Command:
    argv: list[str]
    limits: Limits
    cwd: Path | None = None  # writable cwd/HOME/TMPDIR; None = a fresh private dir per command
    env: dict[str, str] | None = None


def _scrubbed_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "RUST_BACKTRACE": "0"}
    env.update(extra or {})
    return env


def _rlimits(lim: Limits) -> dict:
    out = {"CPU": [lim.cpu_s, lim.cpu_s + 1], "NPROC": lim.nproc, "FSIZE": lim.fsize_mb << 20, "CORE": 0,
           "NOFILE": lim.nofile}
    if lim.data_mb:
        out["DATA"] = lim.data_mb << 20
    if lim.as_mb:
        out["AS"] = lim.as_mb << 20
    return out


def _read_capped(path: Path, cap: int) -> str:
    try:
        with path.open("rb") as f:
            return f.read(cap).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def run_session(sb: Sandbox, commands: list[Command], slot: int = 0, ro: tuple[str, ...] = (),
                rw: tuple[str, ...] = (), drop_uid: bool = True, full_stderr: int = 0) -> list[ProcResult]:
    """Run `commands` one after another in one sandbox (see the module docstring). `ro`/`rw`
    add host paths visible inside (namespaces level); a command's `cwd` must lie under `rw`.
    `drop_uid=False` keeps the caller's uid (rustc at the `rlimits` level when the sandbox uid
    could not read a toolchain under /root there)."""
    logs = Path(tempfile.mkdtemp(prefix="sigil_logs_"))  # host-side, outside anything a command sees
    scratch = Path(tempfile.mkdtemp(prefix="sigil_scratch_"))  # parent of the fresh per-command dirs
    scratch.chmod(0o755)
    uid = sb.uid(slot) if drop_uid else None
    for c in commands:
        if c.cwd is not None and uid is not None:
            os.chown(c.cwd, uid, uid)
    (logs / "root").mkdir()
    read_fd, write_fd = os.pipe()
    spec = {
        "ns": sb.level == "namespaces", "userns": sb.userns, "newroot": str(logs / "root"), "uid": uid,
        "ro": list(sb.ro) + [p for p in ro if p not in sb.ro], "rw": [str(scratch), *rw],
        "logs": str(logs), "scratch": str(scratch), "status_fd": write_fd,
        "commands": [{
            "argv": c.argv, "cwd": str(c.cwd) if c.cwd is not None else None, "env": _scrubbed_env(c.env),
            "wall_s": c.limits.wall_s, "disk_mb": c.limits.disk_mb, "log_cap": c.limits.log_cap,
            "rlimits": _rlimits(c.limits),
        } for c in commands],
    }
    (logs / "spec.json").write_text(json.dumps(spec))
    session_timeout = sum(c.limits.wall_s for c in commands) * 1.2 + 10.0  # a safety net only
    try:
        proc = subprocess.Popen([sb.python, "-I", "-S", LAUNCHER, str(logs / "spec.json")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True, pass_fds=(write_fd,), close_fds=True)
        os.close(write_fd)
        write_fd = -1
        try:
            _, launcher_err = proc.communicate(timeout=session_timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            _, launcher_err = proc.communicate()
        _killpg(proc.pid)
        os.set_blocking(read_fd, False)
        try:
            status = os.read(read_fd, 4096).decode(errors="replace").strip()
        except BlockingIOError:
            status = ""
        if not status and proc.returncode not in (0, -signal.SIGKILL):
            status = launcher_err.decode(errors="replace").strip()[-500:] or f"launcher exit {proc.returncode}"
        if status:
            raise SandboxError(f"The evaluation sandbox (eval.sandbox={sb.level}) failed: {status}; "
                               "set eval.sandbox=rlimits to run without namespaces.")
        done = {}
        for line in _read_capped(logs / "results.jsonl", 1 << 20).splitlines():
            rec = json.loads(line)
            done[rec["i"]] = rec
        out = []
        for i, c in enumerate(commands):
            rec = done.get(i, {"rc": 137, "timed_out": True, "wall_s": c.limits.wall_s})
            out.append(ProcResult(
                returncode=rec["rc"], timed_out=rec["timed_out"], wall_s=rec["wall_s"],
                stdout=_read_capped(logs / f"out{i}", OUTPUT_READ_CAP + 1024),
                stderr=_read_capped(logs / f"err{i}", OUTPUT_READ_CAP + 1024),
                stderr_full=_read_capped(logs / f"err{i}", full_stderr) if full_stderr else "",
                cpu_s=rec.get("cpu_s", 0.0), maxrss_mb=rec.get("maxrss_mb", 0.0), out_bytes=rec.get("out_bytes", 0),
                err_bytes=rec.get("err_bytes", 0), disk_full=rec.get("disk_full", False)))
        return out
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
        shutil.rmtree(logs, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def run_sandboxed(sb: Sandbox, argv: list[str], workdir: Path | None, limits: Limits, slot: int = 0,
                  ro: tuple[str, ...] = (), env: dict[str, str] | None = None, full_stderr: int = 0,
                  drop_uid: bool = True) -> ProcResult:
    """One command in its own sandbox, in `workdir` (writable) or, for None, a fresh private dir."""
    rw = (str(Path(workdir).resolve()),) if workdir is not None else ()
    cmd = Command(argv=argv, limits=limits, cwd=Path(rw[0]) if rw else None, env=env)
    return run_session(sb, [cmd], slot=slot, ro=ro, rw=rw, drop_uid=drop_uid, full_stderr=full_stderr)[0]


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def detect_sandbox(requested: str = "auto") -> Sandbox:
    """The strongest level that works here (`auto`), or the one asked for (failing loudly)."""
    if requested not in LEVELS:
        raise SigilError(f"eval.sandbox={requested!r} is not one of {', '.join(LEVELS)}; use eval.sandbox=auto.")
    root = os.geteuid() == 0
    uid_base = UID_BASE + (os.getpid() % 10**7) * 64
    if requested == "rlimits":
        return _rlimits_level(root, uid_base)
    candidate = Sandbox(level="namespaces", userns=not root, drop_uid=root, uid_base=uid_base)
    probe_dir = Path(tempfile.mkdtemp(prefix="sigil_probe_"))
    try:
        res = run_sandboxed(candidate, ["/bin/sh", "-c", "exit 0"], probe_dir, run_limits(10.0))
        ok = res.returncode == 0
    except SandboxError:
        ok = False
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if ok:
        return candidate
    if requested == "namespaces":
        raise SigilError("eval.sandbox=namespaces but this machine does not allow new namespaces (need root or "
                         "unprivileged user namespaces); use eval.sandbox=auto to fall back to rlimits.")
    return _rlimits_level(root, uid_base)


def _rlimits_level(root: bool, uid_base: int) -> Sandbox:
    """The fallback level; as root, rustc too drops to the sandbox uid if that uid can run it."""
    sb = Sandbox(level="rlimits", drop_uid=root, uid_base=uid_base)
    if not root:
        return sb
    try:
        ok = run_sandboxed(sb, [find_toolchain().rustc, "--version"], None, compile_limits(60.0)).returncode == 0
    except SandboxError:  # exec refused: the uid cannot reach the toolchain
        ok = False
    return sb if ok else Sandbox(level="rlimits", drop_uid=True, uid_base=uid_base,
                                                    rustc_as_root=True)
