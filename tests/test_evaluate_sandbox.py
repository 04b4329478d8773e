"""Hostile samples are contained, reported as failures, and leave the host and their neighbours alone.

Each hostile completion tries its attack and returns the right answer only if the attack worked,
so a sample that escaped would *pass*. They run together with good samples through the batched
path (one crate, one process per sample) with small limits. About 10 s.
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


NAMES = ["infinite_loop", "fork_bomb", "memory_bomb", "huge_output", "write_tmp", "write_parent", "read_ssh",
         "network"]


@pytest.mark.parametrize("name", NAMES)
def test_hostile_sample_is_reported_as_failure(hostile_run, name):
    if name in ("write_tmp", "network") and hostile_run["sandbox"].level != "namespaces":
        pytest.skip(f"{hostile_run['sandbox'].describe()} does not isolate /tmp or the network")
    r = hostile_run["results"][name]
    assert r.verdict in ("test_failure", "timeout"), (r.verdict, r.stderr[-300:])
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
    results = {r.task_id: r for r in execute(samples, ExecConfig(timeout_s=1.5, run_mem_mb=512), sb)}
    assert results.pop("good").verdict == "pass"
    assert {n: r.verdict for n, r in results.items() if r.verdict not in ("test_failure", "timeout")} == {}
    assert _sandbox_processes(sb) == []
