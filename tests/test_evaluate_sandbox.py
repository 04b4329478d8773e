"""Hostile samples are contained, reported as failures, and leave the host and their neighbours alone;
run limits stop what they should (each named in a `resource_limit` verdict) and nothing a
reasonable solution does.

Each hostile completion tries its attack and returns the right answer only if the attack worked,
so a sample that escaped would *pass*. They run together with good samples through the batched
path (one crate, one process per sample) with small limits. About 25 s.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from pathlib import Path

import pytest

from sigil_exp.evaluate.execute import EXCERPT, ExecConfig, Sample, execute, find_toolchain
from sigil_exp.evaluate.sandbox import detect_sandbox

pytestmark = pytest.mark.skipif(
    shutil.which("rustc") is None and not Path("~/.cargo/bin/rustc").expanduser().exists(),
    reason="rustc is not installed")

PROMPT = "/// Adds two numbers.\nfn add(a: i32, b: i32) -> i32 {\n"
TEST = """#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_add() {
        assert_eq!(add(1, 2), 3);
        assert_eq!(add(-1, 1), 0);
        assert_eq!(add(0, 0), 0);
    }
}
"""
GOOD = "    a + b\n}\n"


def _hostile(paths: dict[str, str], port: int) -> dict[str, str]:
    return {
        "infinite_loop": "    loop {}\n}\n",
        "fork_bomb": "    extern \"C\" { fn fork() -> i32; }\n    loop { unsafe { fork(); } }\n}\n",
        "memory_bomb": ("    let mut v: Vec<Vec<u8>> = Vec::new();\n"
                        "    loop { v.push(vec![1u8; 1 << 24]); if v.len() > 1_000_000 { break; } }\n"
                        "    a + b + v.len() as i32 - 1_000_001\n}\n"),
        "huge_output": ("    use std::io::Write;\n    let buf = [b'x'; 65536];\n"
                        "    for _ in 0..100_000 { if std::io::stdout().write_all(&buf).is_err() { return -1; } }\n"
                        "    a + b\n}\n"),
        "write_tmp": f"    std::fs::write(\"{paths['tmp']}\", \"pwned\").map(|_| a + b).unwrap()\n}}\n",
        "write_parent": f"    std::fs::write(\"{paths['parent']}\", \"pwned\").map(|_| a + b).unwrap()\n}}\n",
        "read_ssh": (f"    let home = std::env::var(\"HOME\").unwrap_or_default();\n"
                     f"    let s = std::fs::read_to_string(format!(\"{{}}/.ssh/id_rsa\", home))\n"
                     f"        .or_else(|_| std::fs::read_to_string(\"{paths['ssh']}\"));\n"
                     f"    match s {{ Ok(k) if k.contains(\"SECRET\") => {{ println!(\"{{}}\", k); a + b }}, "
                     f"r => panic!(\"{{:?}}\", r) }}\n}}\n"),
        "network": (f"    match std::net::TcpStream::connect((\"127.0.0.1\", {port})) {{\n"
                    f"        Ok(_) => a + b,\n        Err(e) => panic!(\"{{}}\", e),\n    }}\n}}\n"),
        "background_child": ("    std::process::Command::new(\"/bin/sleep\").arg(\"60\").spawn().unwrap();\n"
                             "    a + b\n}\n"),
    }


def _sandbox_processes(sb) -> list[int]:
    """Host processes running under this process's sandbox uids (there must be none after a run)."""
    left = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                st = os.stat(f"/proc/{name}")
            except FileNotFoundError:
                continue
            if sb.uid_base <= st.st_uid < sb.uid_base + 64:
                left.append(int(name))
    return left


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    tag = secrets.token_hex(6)
    home = tmp / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text(f"SECRET-{tag}\n")
    paths = {"tmp": f"/tmp/sigil_pwned_{tag}", "parent": str(tmp.parent / f"sigil_pwned_{tag}"),
             "ssh": str(home / ".ssh" / "id_rsa")}
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    toolchain = find_toolchain()  # rustup finds its toolchains through the real HOME
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)  # the fake ~/.ssh is the caller's HOME while the samples run
    try:
        hostile = _hostile(paths, server.getsockname()[1])
        samples = [Sample(name, "hostile", PROMPT, body, TEST) for name, body in hostile.items()]
        samples += [Sample(f"good_{i}", "good", PROMPT, GOOD, TEST, i) for i in range(3)]
        sb = detect_sandbox("auto")
        results = execute(samples, ExecConfig(timeout_s=2.0, run_mem_mb=512, workers=2, batch_size=32), sb, toolchain)
    finally:
        if old_home is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = old_home
    connections = 0
    try:
        while True:
            server.accept()[0].close()
            connections += 1
    except BlockingIOError:
        pass
    server.close()
    yield {"results": {r.task_id: r for r in results}, "paths": paths, "connections": connections, "sandbox": sb,
           "tag": tag}
    for p in (paths["tmp"], paths["parent"]):
        Path(p).unlink(missing_ok=True)


EXPECTED = {  # verdict, reason
    "infinite_loop": ("timeout", "test_timeout"), "fork_bomb": ("timeout", "test_timeout"),
    "memory_bomb": ("resource_limit", "memory"), "huge_output": ("resource_limit", "output"),
    "write_tmp": ("test_failure", "test_failed"), "write_parent": ("test_failure", "test_failed"),
    "read_ssh": ("test_failure", "test_failed"), "network": ("test_failure", "test_failed"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_sample_is_reported_as_failure(hostile_run, name):
    if name in ("write_tmp", "network") and hostile_run["sandbox"].level != "namespaces":
        pytest.skip(f"{hostile_run['sandbox'].describe()} does not isolate /tmp or the network")
    r = hostile_run["results"][name]
    assert (r.verdict, r.reason) == EXPECTED[name], r.stderr[-300:]
    assert len(r.stderr) <= EXCERPT


def test_hostile_effects_did_not_reach_the_host(hostile_run):
    assert not Path(hostile_run["paths"]["parent"]).exists()
    assert hostile_run["results"]["infinite_loop"].verdict == "timeout"
    assert hostile_run["results"]["fork_bomb"].verdict == "timeout"
    assert all(hostile_run["tag"] not in r.stderr for r in hostile_run["results"].values())  # no secret in results
    if hostile_run["sandbox"].level == "namespaces":
        assert not Path(hostile_run["paths"]["tmp"]).exists()
        assert hostile_run["connections"] == 0
    assert _sandbox_processes(hostile_run["sandbox"]) == []  # fork bomb and background children are all gone


def test_neighbours_of_hostile_samples_pass(hostile_run):
    results = hostile_run["results"]
    assert [results[f"good_{i}"].verdict for i in range(3)] == ["pass"] * 3
    assert results["background_child"].verdict == "pass"  # legal, and its child was killed afterwards
    assert results["good_0"].path == "batch"  # they shared a crate with the hostile samples


def test_rlimits_fallback_contains_resource_attacks():
    """The level used where namespaces are not allowed still stops loops, memory and output."""
    sb = detect_sandbox("rlimits")
    hostile = _hostile({"tmp": "/nonexistent/x", "parent": "/nonexistent/y", "ssh": "/nonexistent/z"}, 9)
    names = ["infinite_loop", "memory_bomb", "huge_output"] + (["fork_bomb"] if os.geteuid() == 0 else [])
    samples = [Sample(n, "hostile", PROMPT, hostile[n], TEST) for n in names] + [Sample("good", "g", PROMPT, GOOD, TEST)]
    results = {r.task_id: r for r in execute(samples, ExecConfig(timeout_s=3.0, run_mem_mb=512, allow_root=True), sb)}
    assert results.pop("good").verdict == "pass"
    assert {n: (r.verdict, r.reason) for n, r in results.items()} == {n: EXPECTED[n] for n in names}
    assert _sandbox_processes(sb) == []


# ------------------------------------------------------------------------------ run limits
REASONABLE = {  # must pass under the default limits
    "alloc_1_5_gib": ("    let mut v = vec![0u8; 1536 << 20];\n    let n = v.len();\n    v[0] = 1;\n    v[n - 1] = 1;\n"
                      "    a + b + (v[0] + v[n - 1]) as i32 - 2\n}\n"),
    "threads_40": ("    let bar = std::sync::Arc::new(std::sync::Barrier::new(40));\n"
                   "    let hs: Vec<_> = (0..40).map(|i| { let b = bar.clone(); std::thread::spawn(move || { b.wait(); i }) })"
                   ".collect();\n    let s: i32 = hs.into_iter().map(|h| h.join().unwrap()).sum();\n    a + b + s - 780\n}\n"),
    "stdout_6_mib_println": "    for _ in 0..100_000 { println!(\"{}\", \"y\".repeat(63)); }\n    a + b\n}\n",
    "stdout_6_mib_direct": ("    use std::io::Write;\n    let mut o = std::io::stdout().lock();\n"
                            "    for _ in 0..100_000 { o.write_all(&[b'x'; 64]).unwrap(); }\n    a + b\n}\n"),
    "file_32_mib": ("    let p = std::env::temp_dir().join(\"data.bin\");\n    std::fs::write(&p, vec![7u8; 32 << 20]).unwrap();\n"
                    "    a + b + (std::fs::read(&p).unwrap().len() >> 20) as i32 - 32\n}\n"),
}
OVER_LIMIT = {  # name -> (completion, the limit it must be reported as)
    "alloc_bomb": ("    let mut keep = Vec::new();\n    for _ in 0..1024 { keep.push(Vec::<u8>::with_capacity(1 << 30)); }\n"
                   "    a + b + keep.len() as i32 - 1024\n}\n", "memory"),
    "thread_bomb": ("    let hs: Vec<_> = (0..1000).map(|_| std::thread::spawn(|| std::thread::sleep("
                    "std::time::Duration::from_secs(3)))).collect();\n    for h in hs { h.join().unwrap(); }\n    a + b\n}\n",
                    "threads"),
    "stdout_1_gib": ("    use std::io::Write;\n    let mut o = std::io::stdout().lock();\n"
                     "    for _ in 0..16384 { if o.write_all(&[b'x'; 65536]).is_err() { return -1; } }\n    a + b\n}\n",
                     "output"),
    "disk_1_gib_one_file": ("    use std::io::Write;\n    let mut f = std::fs::File::create(std::env::temp_dir().join(\"big\")).unwrap();\n"
                            "    for n in 0..1024 { if let Err(e) = f.write_all(&[1u8; 1 << 20]) { panic!(\"wrote {} MiB: {}\", n, e); } }\n"
                            "    a + b\n}\n", "disk"),
    "disk_1_gib_many_files": ("    use std::io::Write;\n    let mut n = 0;\n    for i in 0..64 {\n"
                              "        let p = std::env::temp_dir().join(format!(\"f{}\", i));\n"
                              "        let mut f = std::fs::File::create(p).unwrap_or_else(|e| panic!(\"wrote {} MiB: {}\", n, e));\n"
                              "        for _ in 0..16 { if let Err(e) = f.write_all(&[1u8; 1 << 20]) { panic!(\"wrote {} MiB: {}\", n, e); }"
                              " n += 1; }\n    }\n    a + b\n}\n", "disk"),
    "cpu_burn": ("    let mut x = 1u64;\n    while std::hint::black_box(x) != 0 { x = x.wrapping_mul(6364136223846793005) | 1; }\n"
                 "    a + b\n}\n", "cpu_time"),
}


@pytest.fixture(scope="module")
def limits_run():
    samples = [Sample(n, "reasonable", PROMPT, c, TEST) for n, c in REASONABLE.items()]
    samples += [Sample(n, "over", PROMPT, c, TEST) for n, (c, _) in OVER_LIMIT.items()]
    sb = detect_sandbox("auto")
    # the defaults, but 3 CPU seconds so that the busy loop hits its limit well before the 20 s timeout
    results = execute(samples, ExecConfig(timeout_s=20.0, run_cpu_s=3.0), sb)
    return {r.task_id: r for r in results}, sb


def test_reasonable_programs_pass_the_default_limits(limits_run):
    results, _ = limits_run
    assert {n: (results[n].verdict, results[n].stderr[-200:]) for n in REASONABLE
            if results[n].verdict != "pass"} == {}
    assert {results[n].path for n in REASONABLE} == {"batch"}


@pytest.mark.parametrize("name", sorted(OVER_LIMIT))
def test_a_hit_limit_is_a_resource_limit_verdict_naming_it(limits_run, name):
    results, sb = limits_run
    if name == "disk_1_gib_many_files" and sb.level != "namespaces":
        pytest.skip("without namespaces only RLIMIT_FSIZE bounds writes, file by file")
    r = results[name]
    assert (r.verdict, r.reason) == ("resource_limit", OVER_LIMIT[name][1]), r.stderr[-300:]


def test_disk_writes_stop_at_the_private_quota(limits_run):
    """1 GiB written in 16 MiB files: the tmpfs (eval.run_disk_mb=256) fills, never the host's /tmp."""
    results, sb = limits_run
    if sb.level != "namespaces":
        pytest.skip("the private tmpfs needs namespaces")
    import re

    written = int(re.search(r"wrote (\d+) MiB", results["disk_1_gib_many_files"].stderr).group(1))
    assert 200 <= written <= 256


@pytest.mark.skipif(os.geteuid() != 0, reason="the rlimits level only runs rustc as root when the caller is root")
def test_rlimits_as_root_never_compiles_as_root_unasked(tmp_path):
    """As root, the rlimits level runs rustc as the sandbox uid; where that uid cannot run the
    toolchain it refuses (one sentence naming the key) unless eval.sandbox_allow_root=true."""
    from sigil_exp.config import SigilError

    secret = tmp_path / "secret.txt"
    secret.write_text("2")
    secret.chmod(0o600)
    tmp_path.chmod(0o755)
    sample = Sample("include_secret", "x", PROMPT, f"    a + b + include_str!(\"{secret}\").len() as i32 - 1\n}}\n", TEST)
    sb = detect_sandbox("rlimits")
    if sb.rustc_as_root:
        with pytest.raises(SigilError, match=r"eval\.sandbox_allow_root=true"):
            execute([sample], ExecConfig(), sb)
        (r,) = execute([sample], ExecConfig(allow_root=True), sb)
        assert r.verdict == "pass" and "rustc-as-root" in sb.describe()  # what the key accepts
    else:  # rustc ran as the sandbox uid: the root-only file stayed closed
        (r,) = execute([sample], ExecConfig(), sb)
        assert r.verdict == "compile_error", r.stderr


def test_each_command_gets_a_fresh_private_dir_and_ipc_namespace():
    """SysV IPC objects and files outlive their process: neither may reach the next command of a
    session (namespaces level; the rlimits level shares the host's IPC and /tmp)."""
    from sigil_exp.evaluate.sandbox import Command, run_limits, run_session

    sb = detect_sandbox("auto")
    if sb.level != "namespaces":
        pytest.skip(f"{sb.describe()} has no private IPC or directories")
    lim = run_limits(10.0, disk_mb=8)
    sh = "/bin/sh"
    res = run_session(sb, [Command(["/usr/bin/ipcmk", "-Q"], lim), Command(["/usr/bin/ipcs", "-q"], lim),
                           Command([sh, "-c", "echo left > f; pwd"], lim), Command([sh, "-c", "ls; pwd"], lim),
                           Command([sh, "-c", "head -c 20000000 /dev/zero > big; echo $?"], lim)])
    assert "Message queue id" in res[0].stdout and "0x" not in res[1].stdout  # the queue stayed behind
    assert res[3].stdout.split() == [res[2].stdout.strip()]  # same mount point, empty again
    assert res[4].stdout.strip() != "0" and res[4].disk_full  # 20 MB do not fit in eval.run_disk_mb=8
