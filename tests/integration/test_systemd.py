"""deploy/systemd: the units pass `systemd-analyze verify`, their environment file names only
variables the commands read, the commands they start run with it and exit 0 on SIGTERM, and
the Mosquitto drop-in with the shipped settings runs a real Mosquitto."""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from mqinfer.broker.ports import free_port
from mqinfer.cli import parser as cli_parser
from tests.integration.harness import (
    MOSQUITTO_CONF,
    REPO,
    REQUIRE_MOSQUITTO,
    Broker,
    need_client_tool,
    need_mosquitto,
    wait_for,
)

SYSTEMD = REPO / "deploy" / "systemd"
UNITS = ("mqinfer-coordinator.service", "mqinfer-node.service")
DROP_IN = SYSTEMD / "mosquitto-mqinfer.conf"
INSTALLED = "/opt/mqinfer/bin/mqinfer"  # ExecStart's program, where the README installs it
# Debian's and Ubuntu's /etc/mosquitto/mosquitto.conf (mosquitto 2.0.x packages): these
# settings are there, so a drop-in must not repeat them.
DEBIAN_MAIN = """\
pid_file /run/mosquitto/mosquitto.pid

persistence true
persistence_location /var/lib/mosquitto/

log_dest file /var/log/mosquitto/mosquitto.log

include_dir /etc/mosquitto/conf.d
"""


def need_systemd_analyze() -> str:
    found = shutil.which("systemd-analyze") or (
        "/usr/bin/systemd-analyze" if os.access("/usr/bin/systemd-analyze", os.X_OK) else None
    )
    if found is None:
        if REQUIRE_MOSQUITTO:
            pytest.fail("MQINFER_REQUIRE_MOSQUITTO=1 but systemd-analyze is not installed")
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return found


def program() -> str:
    """The `mqinfer` script of the environment the tests run in."""
    script = Path(sys.executable).parent / "mqinfer"
    found = str(script) if os.access(script, os.X_OK) else shutil.which("mqinfer")
    assert found, "no mqinfer script next to the Python running the tests, nor on PATH"
    return found


def unit_lines(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of each setting, in order (keys repeat: no configparser)."""
    out, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def env_file(path: Path, commented: bool = False) -> dict[str, str]:
    """KEY=VALUE lines as systemd reads them; with `commented`, the `#KEY=VALUE` ones too."""
    out = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if commented and line.startswith("#MQINFER_"):
            line = line[1:]
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


def verify(tmp_path: Path, units: dict[str, str]) -> str:
    """`systemd-analyze verify` on these unit texts; what it says about them."""
    paths = []
    for name, text in units.items():
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    done = subprocess.run(
        [need_systemd_analyze(), "verify", *paths],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    said = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if any(name in line for name in units)
    ]
    assert done.returncode == 0 or said, done.stdout + done.stderr
    return "\n".join(said)


def runnable(name: str) -> str:
    """The unit, its ExecStart pointed at this environment's mqinfer."""
    text = (SYSTEMD / name).read_text()
    assert f"ExecStart={INSTALLED} " in text
    return text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={program()} ")


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    said = verify(tmp_path, {name: runnable(name) for name in UNITS})
    assert said == "", said
    # The hardening stays: systemd's own exposure score (0 best, 10 worst) of each unit.
    for name in UNITS:
        done = subprocess.run(
            [need_systemd_analyze(), "security", "--offline=yes", str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
        assert score, done.stdout + done.stderr
        assert float(score[1]) <= 2.5, f"{name}: exposure {score[1]}\n{done.stdout}"


def test_verify_would_catch_a_mistyped_setting(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a missing program are reported."""
    bad = runnable(UNITS[1]).replace("ProtectSystem=strict", "ProtectSytem=strict")
    assert "Unknown key 'ProtectSytem'" in verify(tmp_path, {UNITS[1]: bad})
    missing = (SYSTEMD / UNITS[0]).read_text()
    assert "is not executable" in verify(tmp_path, {UNITS[0]: missing}) or os.access(
        INSTALLED, os.X_OK
    )


def test_units_settings_are_what_the_commands_need() -> None:
    for name, command in zip(UNITS, ("coordinator", "node"), strict=True):
        settings = unit_lines(SYSTEMD / name)
        got = {(s, k): v for s, k, v in settings}
        assert got[("Service", "ExecStart")] == f"{INSTALLED} {command}"
        assert got[("Service", "Restart")] == "on-failure"
        assert got[("Service", "RestartPreventExitStatus")] == "2 3"  # usage, refused login
        for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
            assert got[("Service", key)] == "yes", (name, key)
        assert got[("Service", "ProtectSystem")] == "strict"
        assert got[("Service", "User")] == "mqinfer"
        env_files = [v for s, k, v in settings if k == "EnvironmentFile"]
        assert env_files == ["/etc/mqinfer/mqinfer.env", "-/etc/mqinfer/%N.env"]
    node = dict((k, v) for _, k, v in unit_lines(SYSTEMD / "mqinfer-node.service"))
    assert node["CacheDirectory"] == "mqinfer"
    environment = [
        v for _, k, v in unit_lines(SYSTEMD / "mqinfer-node.service") if k == "Environment"
    ]
    assert "MQINFER_CACHE_DIR=%C/mqinfer" in environment
    # The node keeps its devices (accelerators); nothing in either unit maps them away.
    assert "PrivateDevices" not in node


def test_environment_file_names_only_variables_the_commands_read() -> None:
    """Every MQINFER_* of the example, set or commented out, is one that `mqinfer node` or
    `mqinfer coordinator` reads: named in their --help or read through options.env() (a
    misspelt one would be ignored without a word)."""
    actions = cli_parser()._actions  # argparse names its subcommands nowhere public
    commands = next(a.choices for a in actions if isinstance(a, argparse._SubParsersAction))
    helps = " ".join(" ".join(commands[c].format_help().split()) for c in ("node", "coordinator"))
    source = "\n".join(p.read_text() for p in (REPO / "mqinfer").rglob("*.py"))
    read = {f"MQINFER_{n}" for n in re.findall(r'\benv\(\s*"([A-Z_]+)"', source)}
    names = set(env_file(SYSTEMD / "mqinfer.env", commented=True))
    assert {"MQINFER_BROKER", "MQINFER_USERNAME", "MQINFER_PASSWORD_FILE"} <= names
    unknown = sorted(n for n in names if n not in helps and n not in read)
    assert unknown == [], f"not read by mqinfer node/coordinator: {unknown}"
    assert "MQINFER_CACHE_DIR" in helps


# ---- Mosquitto with the drop-in ---------------------------------------------------------------


def directives(text: str) -> list[str]:
    return [
        " ".join(line.split()) for line in text.splitlines() if line.strip()[:1] not in ("#", "")
    ]


def test_drop_in_is_the_shipped_config_less_what_the_package_sets() -> None:
    shipped, drop_in, main = (
        directives(MOSQUITTO_CONF.read_text()),
        directives(DROP_IN.read_text()),
        directives(DEBIAN_MAIN),
    )
    main_keys = {line.split()[0] for line in main}
    assert [line for line in shipped if line.split()[0] not in main_keys] == drop_in
    assert not {line.split()[0] for line in drop_in} & main_keys


class PackagedMosquitto(Broker):
    """Mosquitto started with workdir/mosquitto.conf as it is (not derived from ours)."""

    def _command(self) -> list[str]:
        return [need_mosquitto(), "-c", str(self.workdir / "mosquitto.conf")]


def start_packaged_mosquitto(tmp_path: Path) -> tuple[Broker, dict[str, str]]:
    """Mosquitto as a Debian package runs it: its main config including conf.d/, with our
    drop-in there; paths and the listener moved into tmp_path, accounts by `mqinfer accounts`."""
    need_mosquitto()
    site = tmp_path / "site"
    made = subprocess.run(
        [program(), "accounts", "--out", str(site), "--node", "edge-01", "--operator", "ops",
         "--observer", "watch"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    port = free_port()
    conf_d, data = tmp_path / "conf.d", tmp_path / "data"
    conf_d.mkdir()
    data.mkdir()
    (conf_d / "mqinfer.conf").write_text(
        DROP_IN.read_text()
        .replace("\nlistener 1883\n", f"\nlistener {port} 127.0.0.1\n")
        .replace("/etc/mosquitto/mqinfer/", f"{site}/")
    )
    main = (
        DEBIAN_MAIN.replace("/run/mosquitto/", f"{tmp_path}/")
        .replace("/var/lib/mosquitto/", f"{data}/")
        .replace("log_dest file /var/log/mosquitto/mosquitto.log", "log_dest stderr")
        .replace("/etc/mosquitto/conf.d", str(conf_d))
    )
    # As root, Mosquitto would become the 'mosquitto' user, who cannot read tmp_path.
    main += f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
    (tmp_path / "mosquitto.conf").write_text(main)
    broker = PackagedMosquitto("mosquitto", port, tmp_path)
    broker.start()
    passwords = {p.name: p.read_text().strip() for p in (site / "secrets").iterdir()}
    return broker, passwords


def test_packaged_mosquitto_runs_with_the_drop_in(tmp_path: Path) -> None:
    broker, passwords = start_packaged_mosquitto(tmp_path)
    try:
        pub = need_client_tool("mosquitto_pub")
        base = [pub, "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1"]
        anonymous = subprocess.run(
            [*base, "-t", "mqinfer/x", "-m", "hi"], capture_output=True, timeout=30, check=False
        )
        assert anonymous.returncode == 5, anonymous.stderr  # refused: not authorised
        ops = ["-u", "ops", "-P", passwords["ops"]]
        spec = subprocess.run(
            [*base, *ops, "-t", "mqinfer/services/x/spec", "-n", "-r"], timeout=30, check=False
        )
        assert spec.returncode == 0
        assert "Error" not in broker.log()
    finally:
        broker.stop()


def test_commands_run_with_the_units_environment_and_exit_0_on_sigterm(tmp_path: Path) -> None:
    """The node and the coordinator started as the units start them (their ExecStart, the
    example environment file, the unit's Environment=) log in to the packaged Mosquitto, the
    node caches a deployed model in the unit's cache directory, and SIGTERM ends both with 0."""
    broker, passwords = start_packaged_mosquitto(tmp_path)
    secrets = tmp_path / "site" / "secrets"
    cache_root = tmp_path / "cache"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, account in zip(UNITS, ("coordinator", "edge-01"), strict=True):
            settings = unit_lines(SYSTEMD / name)
            env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
            for key, value in (v.split("=", 1) for _, k, v in settings if k == "Environment"):
                env[key] = value.replace("%C", str(cache_root))
            env.update(env_file(SYSTEMD / "mqinfer.env"))  # EnvironmentFile= beats Environment=
            env.update(
                MQINFER_BROKER=broker.url,
                MQINFER_USERNAME=account,
                MQINFER_PASSWORD_FILE=str(secrets / account),
            )
            argv = next(v for _, k, v in settings if k == "ExecStart").split()
            argv[0] = program()
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - kept by the process
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        watch = ["--broker", broker.url, "--username", "watch"]
        (tmp_path / "watch").write_text(passwords["watch"])
        watch += ["--password-file", str(tmp_path / "watch")]

        def nodes() -> list[str]:
            out = subprocess.run(
                [program(), "status", "--json", *watch], capture_output=True, timeout=60
            )
            return [n["state"] for n in orjson.loads(out.stdout)["nodes"]] if out.stdout else []

        wait_for(lambda: nodes() == ["online"], "edge-01 online")
        model = REPO / "models" / "digits" / "digits_int8.tflite"
        (tmp_path / "ops").write_text(passwords["ops"])
        deployed = subprocess.run(
            [program(), "deploy", "--model", str(model), "--name", "digits", "--wait",
             "--timeout", "60", "--broker", broker.url, "--username", "ops",
             "--password-file", str(tmp_path / "ops")],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stderr
        cached = [p.name for p in (cache_root / "mqinfer").iterdir()]
        assert any(name.endswith(".tflite") for name in cached), cached
        for p in reversed(procs):  # the node first, then the coordinator
            p.send_signal(signal.SIGTERM)
            assert p.wait(30) == 0
        for name in UNITS:
            assert "Traceback" not in (tmp_path / f"{name}.log").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        broker.stop()


# ---- the system call filter ---------------------------------------------------------------------


def syscall_set(analyze: str, group: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a `SystemCallFilter=` group, its nested groups expanded."""
    seen = set() if seen is None else seen
    out = subprocess.run(
        [analyze, "syscall-filter", group], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    calls: set[str] = set()
    for line in out[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("@"):
            if item not in seen:
                seen.add(item)
                calls |= syscall_set(analyze, item, seen)
        else:
            calls.add(item)
    return calls


def traced(strace: str, out: Path, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(
            [strace, "-f", "-qq", "-c", "-o", str(out), *argv], stdout=f, stderr=subprocess.STDOUT
        )


def traced_child(tracer: subprocess.Popen[bytes]) -> int:
    """The pid of the program strace started (signals go to it, not to strace)."""

    def child() -> int | None:
        path = Path(f"/proc/{tracer.pid}/task/{tracer.pid}/children")
        pids = path.read_text().split() if path.exists() else []
        return int(pids[0]) if pids else None

    return int(wait_for(child, "strace to start its program"))


def test_units_syscall_filter_allows_every_call_the_commands_make(
    mosquitto: Broker, prefix: str, tmp_path: Path
) -> None:
    """The node serving a TFLite and an ONNX model, and the coordinator placing them and
    passing requests, make no system call outside their unit's SystemCallFilter= (one
    outside would fail with EPERM under systemd)."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (Debian: apt-get install strace)")
    analyze = need_systemd_analyze()
    common = ["--broker", mosquitto.url, "--prefix", prefix]
    roles = {
        "mqinfer-coordinator.service": [program(), "coordinator", *common],
        "mqinfer-node.service": [
            program(), "node", *common, "--id", "edge-01", "--heartbeat", "1",
            "--cache-dir", str(tmp_path / "cache"),
        ],
    }  # fmt: skip
    tracers = {}
    try:
        for name, argv in roles.items():
            tracers[name] = traced(strace, tmp_path / f"{name}.calls", argv, tmp_path / name)
        children = {name: traced_child(t) for name, t in tracers.items()}
        samples = sorted((REPO / "models" / "digits" / "samples").glob("*.png"))[:3]
        for model, service in (("digits_int8.tflite", "ints"), ("digits.onnx", "floats")):
            path = REPO / "models" / "digits" / model
            deployed = subprocess.run(
                [program(), "deploy", "--model", str(path), "--name", service, "--wait",
                 "--timeout", "60", *common],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert deployed.returncode == 0, deployed.stderr
            answered = subprocess.run(
                [program(), "infer", service, *map(str, samples), "--json", *common],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert answered.returncode == 0, answered.stderr
            assert answered.stdout.count('"ok": true') + answered.stdout.count('"ok":true') == 3
        for name in ("mqinfer-node.service", "mqinfer-coordinator.service"):
            os.kill(children[name], signal.SIGTERM)
            assert tracers[name].wait(60) == 0, (tmp_path / name).read_text()
    finally:
        for t in tracers.values():
            if t.poll() is None:
                t.kill()
                t.wait()
    for name in roles:
        settings = unit_lines(SYSTEMD / name)
        groups = [v for _, k, v in settings if k == "SystemCallFilter"]
        assert groups == ["@system-service"], groups
        allowed = syscall_set(analyze, groups[0])
        report = (tmp_path / f"{name}.calls").read_text()
        calls = {
            line.split()[-1]
            for line in report.splitlines()[2:]
            if line.strip() and not line.lstrip().startswith(("-", "%")) and "total" not in line
        }
        assert len(calls) > 20, report  # strace saw the program's calls
        assert sorted(calls - allowed) == [], f"{name}: calls outside {groups[0]}"
