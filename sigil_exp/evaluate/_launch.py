"""Sandbox launcher: `python -I -S _launch.py <spec.json>` runs a session of commands, isolated.

It is its own fresh, single-threaded process (started by `sandbox.run_session` with
`start_new_session=True`), so fork/unshare/setuid never run inside the threaded evaluator.
Standard library only and nothing from the package: it must start fast.

With namespaces (spec["ns"]):
    launcher (host pid ns) -- unshare(mount, net, pid, ipc, uts [, user]) -- fork
      init (pid 1 of the new pid ns; dies with the launcher): a new root (tmpfs + read-only binds
      of the system dirs and spec["ro"], spec["rw"] read-write, fresh /proc, an empty read-only
      /tmp: the only writable places are the rw binds),
      pivot_root; then for each command, in order:
        a fresh private working directory (commands without a cwd): a size-limited tmpfs on
                /sandbox, unmounted after the command (the disk quota)
        fork -- target: own process group, own ipc namespace, rlimits, no_new_privs, the sandbox
                uid, execve with a scrubbed env, stdout/stderr to files in the host-side logs dir
        wait with the command's own wall-clock timeout; then kill(-1): every process left in
        the namespace dies, and all are reaped before the next command starts.
    When init exits (or the launcher is killed) the kernel kills whatever is left in the pid ns.
Without namespaces the launcher itself plays init (a child subreaper): after each command it
kills every process of the sandbox uid at once (when it dropped root to one), then every
descendant it finds in /proc until none is left.

Results go to `results.jsonl` in the logs dir, one line per finished command (exit status,
timeout, CPU seconds, peak RSS, stdout/stderr sizes, whether the tmpfs filled up); stdout/stderr
of a command with a `log_cap` are cut to their first and last log_cap/2 bytes right after it, so
a chatty program never leaves more than one file's worth on the host disk. Setup failures
go to the status pipe (spec["status_fd"], closed on exec), so a sandboxed program cannot fake one.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
SYS_PIVOT_ROOT = 155  # x86_64
PRIVATE = "/sandbox"  # namespaces: where a command's private tmpfs is mounted (its cwd, HOME, TMPDIR)
RLIMITS = {"AS": resource.RLIMIT_AS, "DATA": resource.RLIMIT_DATA, "CPU": resource.RLIMIT_CPU,
           "NPROC": resource.RLIMIT_NPROC, "FSIZE": resource.RLIMIT_FSIZE, "CORE": resource.RLIMIT_CORE,
           "NOFILE": resource.RLIMIT_NOFILE}

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


class SetupError(Exception):
    pass


def _check(ret, what):
    if ret != 0:
        raise SetupError(f"{what}: {os.strerror(ctypes.get_errno())}")


def _enc(s):
    return None if s is None else s.encode()


def _mount(src, dst, fstype, flags, data=None):
    _check(libc.mount(_enc(src), _enc(dst), _enc(fstype), flags, _enc(data)), f"mount {src} on {dst}")


def _locked_flags(path):
    """Flags a bind remount must keep (a user namespace may not clear them)."""
    f = os.statvfs(path).f_flag
    return (MS_NOSUID if f & os.ST_NOSUID else 0) | (MS_NODEV if f & os.ST_NODEV else 0) | \
        (MS_NOEXEC if f & os.ST_NOEXEC else 0)


def _bind(src, dst, readonly):
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    _mount(src, dst, None, MS_BIND | MS_REC)
    if readonly:
        _mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _locked_flags(dst))


def _build_root(spec):
    """Private mount tree: a tmpfs root holding only what the commands need, then pivot_root."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    new = spec["newroot"]
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=0755")
    os.makedirs(new + "/tmp", exist_ok=True)  # read-only once the binds below are in place
    os.makedirs(new + PRIVATE, exist_ok=True)
    _mount("tmpfs", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in spec["ro"]:
        if os.path.islink(path):  # /bin -> usr/bin on merged-/usr systems
            dst = new + path
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.readlink(path), dst)
        elif os.path.exists(path):
            _bind(path, new + path, readonly=True)
    for dev in ("null", "zero", "full", "random", "urandom"):
        _bind("/dev/" + dev, new + "/dev/" + dev, readonly=False)
    os.symlink("/proc/self/fd", new + "/dev/fd")
    for path in spec["rw"]:
        _bind(path, new + path, readonly=False)
    os.makedirs(new + "/proc", exist_ok=True)
    _mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(new)
    _check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    _mount(None, "/tmp", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _exec_target(cmd, cwd, uid, out_fd, err_fd, status_fd, new_ipc):
    """In the forked target: stdio, limits, privileges, exec. Never returns."""
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores them; an exec'd program must not
            signal.signal(sig, signal.SIG_DFL)
        os.setpgid(0, 0)
        if new_ipc:  # SysV IPC objects outlive their process: none may pass to the next command
            _check(libc.unshare(CLONE_NEWIPC), "unshare ipc")
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.chdir(cwd)
        for name, value in cmd["rlimits"].items():
            soft, hard = value if isinstance(value, list) else (value, value)  # CPU: SIGXCPU at soft
            limit = resource.getrlimit(RLIMITS[name])[1]
            if limit != resource.RLIM_INFINITY:
                soft, hard = min(soft, limit), min(hard, limit)
            resource.setrlimit(RLIMITS[name], (soft, hard))
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        env = dict(cmd["env"], HOME=cwd, TMPDIR=cwd)
        os.execve(cmd["argv"][0], cmd["argv"], env)
    except Exception as e:  # noqa: BLE001 - reported through the status pipe
        os.write(status_fd, f"{cmd['argv'][0]}: {type(e).__name__}: {e}\n".encode()[:2000])
    os._exit(125)


def _reap_all():
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _reap_ready():
    while True:
        try:
            got, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if got <= 0:
            return


def _descendants(root):
    """Pids whose parent chain leads to `root` (from /proc)."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            parent[int(name)] = int(stat[stat.rindex(b")") + 2:].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in found}
        found |= frontier
    return found


def _kill_uid(uid):
    """kill(-1, SIGKILL) as `uid`: every process of that uid dies in one pass of the kernel's
    task list, which new forks cannot outrun (killing pid by pid, a fork bomb can)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)  # never the caller itself
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _cleanup(spec):
    """Kill and reap everything the last command left behind."""
    if spec["ns"]:
        if os.getpid() == 1:  # only ever as pid 1 of our own namespace: kill(-1) reaches just that
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap_all()
        return
    if spec.get("uid") is not None:  # the sandbox uid's own processes: all of them, at once
        _kill_uid(spec["uid"])
    me = os.getpid()
    for _ in range(200):  # the launcher is a child subreaper: orphans come back to it
        left = _descendants(me)
        if not left:
            break
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _reap_ready()
        time.sleep(0.005)
    _reap_ready()


def _compact(logs_fd, name, cap):
    """Cut the file to its first and last cap/2 bytes; returns its size before."""
    fd = os.open(name, os.O_RDWR, dir_fd=logs_fd)
    try:
        size = os.fstat(fd).st_size
        if cap and size > cap:
            half = cap // 2
            tail = os.pread(fd, half, size - half)
            marker = f"\n[... {size - 2 * half} bytes cut ...]\n".encode()
            os.pwrite(fd, marker + tail, half)
            os.ftruncate(fd, half + len(marker) + len(tail))
        return size
    finally:
        os.close(fd)


def _private_dir(spec, i, cmd):
    """A fresh directory for a command without a cwd. With namespaces: a tmpfs of cmd["disk_mb"]
    mounted on /sandbox (empty, in the new root); else a directory with a random name under the
    scratch dir. Returns (path, mounted)."""
    uid = spec.get("uid")
    mounted = bool(spec["ns"] and cmd.get("disk_mb"))
    if mounted:
        cwd = PRIVATE
        _mount("tmpfs", cwd, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cmd['disk_mb']}m,mode=0700")
    else:
        cwd = os.path.join(spec["scratch"], f"r{i}-{os.urandom(8).hex()}")
        os.mkdir(cwd, 0o700)
    if uid is not None:
        os.chown(cwd, uid, uid)
    return cwd, mounted


def _release_dir(cwd):
    """Whether the tmpfs filled up (the disk quota was hit); then unmount it."""
    st = os.statvfs(cwd)
    full = st.f_bavail * st.f_frsize < max(st.f_blocks * st.f_frsize // 100, 64 * 1024)
    _check(libc.umount2(cwd.encode(), MNT_DETACH), "umount private dir")
    return full


def _run_command(spec, i, cmd, logs_fd, status_fd):
    uid = spec.get("uid")
    cwd = cmd.get("cwd")
    mounted = False
    if cwd is None:
        cwd, mounted = _private_dir(spec, i, cmd)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    out_fd = os.open(f"out{i}", flags, 0o600, dir_fd=logs_fd)
    err_fd = os.open(f"err{i}", flags, 0o600, dir_fd=logs_fd)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _exec_target(cmd, cwd, uid, out_fd, err_fd, status_fd, spec["ns"])
    os.close(out_fd)
    os.close(err_fd)
    deadline = t0 + cmd["wall_s"]
    status, usage, timed_out = None, None, False
    while status is None:
        while True:  # reap whatever exited (orphans included) without blocking
            try:
                got, st, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                got = -1
            if got <= 0:
                break
            if got == pid:
                status, usage = st, ru
                break
        if status is not None:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)  # still our unreaped child: the pid cannot be reused
            _, status, usage = os.wait4(pid, 0)
            break
        signal.sigtimedwait([signal.SIGCHLD], min(remaining, 0.5))
    wall = time.monotonic() - t0
    _cleanup(spec)
    disk_full = _release_dir(cwd) if mounted else False
    rc = os.waitstatus_to_exitcode(status)
    cap = cmd.get("log_cap", 0)
    return {"i": i, "rc": rc if rc >= 0 else 128 - rc, "timed_out": timed_out, "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_mb": usage.ru_maxrss / 1024,
            "out_bytes": _compact(logs_fd, f"out{i}", cap), "err_bytes": _compact(logs_fd, f"err{i}", cap),
            "disk_full": disk_full}


def _session(spec, logs_fd, status_fd):
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    res_fd = os.open("results.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600, dir_fd=logs_fd)
    for i, cmd in enumerate(spec["commands"]):
        line = json.dumps(_run_command(spec, i, cmd, logs_fd, status_fd)) + "\n"
        os.write(res_fd, line.encode())
    os.close(res_fd)


def _fail(status_fd, e):
    os.write(status_fd, f"{type(e).__name__}: {e}\n".encode()[:2000])
    os._exit(125)


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    status_fd = spec["status_fd"]
    os.set_inheritable(status_fd, False)
    logs_fd = os.open(spec["logs"], os.O_RDONLY | os.O_DIRECTORY)
    if not spec["ns"]:
        try:
            _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "child_subreaper")
        except Exception as e:  # noqa: BLE001
            _fail(status_fd, e)
        _session(spec, logs_fd, status_fd)
        return
    try:
        uid, gid = os.getuid(), os.getgid()
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        if spec["userns"]:
            flags |= CLONE_NEWUSER
        _check(libc.unshare(flags), "unshare")
        if spec["userns"]:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
    except Exception as e:  # noqa: BLE001
        _fail(status_fd, e)
    init = os.fork()
    if init:
        os.close(status_fd)
        _, st = os.waitpid(init, 0)
        os._exit(os.waitstatus_to_exitcode(st) & 0xFF)
    try:  # pid 1 of the new pid namespace
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        _build_root(spec)
    except Exception as e:  # noqa: BLE001
        _fail(status_fd, e)
    _session(spec, logs_fd, status_fd)
    os._exit(0)


if __name__ == "__main__":
    main()
