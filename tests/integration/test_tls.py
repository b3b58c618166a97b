"""Mutual TLS and passwords kept off the command line, on a real Mosquitto.

The broker runs the shipped config with its commented-out mutual-TLS listener switched on
(deploy/mosquitto/mosquitto.conf), next to the plain listener with a password file. The
CA, the broker's certificate and the clients' certificates are made with `openssl` for
each test run; a second CA signs a certificate the broker must refuse.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from mqinfer.broker.ports import free_port
from mqinfer.mqtt.session import EXIT_AUTH
from mqinfer.protocol.topics import Topics
from tests.integration.harness import (
    MOSQUITTO_CONF,
    Broker,
    Procs,
    need_client_tool,
    need_mosquitto,
    wait_for,
)
from tests.integration.requests import DIGITS, mqinfer

CLIENTS = ("n1", "coordinator", "deployer", "sensor")


def _openssl(command: str, cwd: Path) -> None:
    """Run `openssl` with the words of `command` (no word has a space in it)."""
    binary = shutil.which("openssl")
    assert binary, "the openssl command is needed to make the test certificates"
    subprocess.run([binary, *command.split()], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    """A self-signed CA: {name}.pem and {name}.key in `d` (the same steps as the README's)."""
    _openssl(
        f"req -x509 -newkey rsa:2048 -nodes -days 2 -keyout {name}.key -out {name}.pem "
        f"-subj /CN={name}",
        d,
    )


def _signed(d: Path, name: str, cn: str, ca: str, san: str | None = None) -> None:
    """A key and a certificate for `cn`, signed by `ca` (with subjectAltName `san`)."""
    _openssl(
        f"req -new -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={cn}", d
    )
    ext = ""
    if san is not None:
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        ext = f" -extfile {name}.ext"
    _openssl(
        f"x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -days 2 "
        f"-out {name}.pem{ext}",
        d,
    )


@dataclass
class Site:
    broker: Broker  # plain listener (password file) at broker.port
    tls_port: int  # the shipped mutual-TLS listener
    pki: Path
    passwd_user: str = "sensor"
    password: str = "right horse battery"

    def ca(self) -> str:
        return str(self.pki / "ca.pem")

    def tls(self, who: str, ca: str = "ca") -> list[str]:
        """mqinfer options for a client with `who`'s certificate."""
        return [
            "--tls-ca",
            str(self.pki / f"{ca}.pem"),
            "--tls-cert",
            str(self.pki / f"{who}.pem"),
            "--tls-key",
            str(self.pki / f"{who}.key"),
        ]

    def tool_tls(self, who: str | None) -> list[str]:
        """mosquitto_pub/_sub options: over TLS, with `who`'s certificate if given."""
        conn = ["-h", "127.0.0.1", "-p", str(self.tls_port), "--cafile", self.ca()]
        if who is not None:
            conn += ["--cert", str(self.pki / f"{who}.pem"), "--key", str(self.pki / f"{who}.key")]
        return conn


def shipped_tls_listener(port: int, certs: Path) -> str:
    """The commented-out mutual-TLS block of the shipped config, switched on, on `port`
    with the certificates in `certs`."""
    lines = MOSQUITTO_CONF.read_text().splitlines()
    start = lines.index("#listener 8883")
    block: list[str] = []
    for line in lines[start:]:
        if not line.startswith("#") or line.startswith("# "):
            if block and not line.startswith("# "):
                break
            continue
        block.append(line[1:])
    text = "\n".join(block) + "\n"
    assert "require_certificate true" in text and "use_identity_as_username true" in text
    text = text.replace("listener 8883", f"listener {port} 127.0.0.1")
    return text.replace("/etc/mosquitto/certs/", f"{certs}/")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    need_mosquitto()
    passwd_tool = need_client_tool("mosquitto_passwd")
    pki = tmp_path / "pki"
    pki.mkdir()
    _ca(pki, "ca")
    _ca(pki, "other-ca")
    _signed(pki, "broker", "localhost", "ca", san="IP:127.0.0.1,DNS:localhost")
    for who in CLIENTS:
        _signed(pki, who, who, "ca")
    _signed(pki, "rogue", "n1", "other-ca")  # a node's name, signed by a CA nobody trusts
    passwd = tmp_path / "mqinfer.passwd"
    s = Site(Broker("mosquitto", free_port(), tmp_path), free_port(), pki)
    subprocess.run(
        [passwd_tool, "-c", "-b", str(passwd), s.passwd_user, s.password], check=True, timeout=30
    )
    s.broker.passwd = passwd
    s.broker.extra_conf = shipped_tls_listener(s.tls_port, pki)
    s.broker.start()
    yield s
    s.broker.stop()


def status(site: Site, prefix: str, who: str) -> dict[str, Any] | None:
    out = mqinfer(
        "status",
        "--json",
        "--broker",
        f"127.0.0.1:{site.tls_port}",
        "--prefix",
        prefix,
        *site.tls(who),
        timeout=60,
    )
    return orjson.loads(out.stdout) if out.returncode == 0 else None


def test_node_and_coordinator_serve_over_mutual_tls(
    site: Site, prefix: str, procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node (TLS files as options) and a coordinator (TLS files in the environment)
    connect to the shipped mutual-TLS listener with a URL without a scheme (TLS implied);
    a model deploys over it, and a PNG sent with the real mosquitto_pub over TLS gets the
    right digit, read with the real mosquitto_sub over TLS."""
    pub, sub = need_client_tool("mosquitto_pub"), need_client_tool("mosquitto_sub")
    url = f"127.0.0.1:{site.tls_port}"
    node = procs.node(site.broker, prefix, "n1", *site.tls("n1"), url=url)
    files = {"CA": "ca.pem", "CERT": "coordinator.pem", "KEY": "coordinator.key"}
    for name, file in files.items():  # the coordinator process inherits the environment
        monkeypatch.setenv(f"MQINFER_TLS_{name}", str(site.pki / file))
    coord = procs.start(
        "coordinator", "coordinator", "--id", "c1", "--broker", url, "--prefix", prefix
    )
    for name in files:
        monkeypatch.delenv(f"MQINFER_TLS_{name}")

    def online() -> bool:
        st = status(site, prefix, "deployer")
        return bool(
            st
            and st["coordinator"]
            and any(n["id"] == "n1" and n["state"] == "online" for n in st["nodes"])
        )

    wait_for(online, "n1 and the coordinator online over TLS", timeout=90)
    for p in (node, coord):
        assert f"connected to mqtts://127.0.0.1:{site.tls_port}" in p.log(), p.log()
    out = mqinfer(
        "deploy",
        "--model",
        str(DIGITS / "digits_int8.tflite"),
        "--name",
        "digits",
        "--wait",
        "--timeout",
        "90",
        "--broker",
        url,
        "--prefix",
        prefix,
        *site.tls("deployer"),
    )
    assert out.returncode == 0, f"deploy failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"

    sample = sorted((DIGITS / "samples").glob("digit_*.png"))[0]
    label = sample.name.split("_")[1]
    t = Topics(prefix)
    reader = subprocess.Popen(
        [
            "stdbuf",
            "-oL",
            sub,
            *site.tool_tls("sensor"),
            "-d",
            "-t",
            t.service_result("digits", "cam-1"),
            "-C",
            "1",
            "-W",
            "60",
        ],
        stdout=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    try:
        assert reader.stdout is not None
        for line in reader.stdout:
            if "SUBACK" in line:
                break
        subprocess.run(
            [
                pub,
                *site.tool_tls("sensor"),
                "-t",
                t.service_request("digits", "cam-1"),
                "-f",
                str(sample),
                "-q",
                "1",
            ],
            check=True,
            timeout=30,
        )
        line = next((line for line in reader.stdout if line.startswith("{")), "")
        reader.wait(30)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    result = orjson.loads(line)
    assert result["ok"] and result["request_id"] == "cam-1" and result["node"] == "n1"
    assert result["top"][0]["label"] == label


def _retained_first(site: Site, prefix: str, probe: str) -> str:
    """The first retained message a trusted client gets from [probe, marker]: Mosquitto
    sends the retained messages of a SUBSCRIBE's filters in their order, so this is the
    probe's if anything was stored there, else the marker's."""
    pub, sub = need_client_tool("mosquitto_pub"), need_client_tool("mosquitto_sub")
    marker = f"{prefix}/marker"
    subprocess.run(
        [pub, *site.tool_tls("sensor"), "-t", marker, "-m", "marker", "-r", "-q", "1"],
        check=True,
        timeout=30,
    )
    out = subprocess.run(
        [sub, *site.tool_tls("sensor"), "-t", probe, "-t", marker, "-C", "1", "-W", "30"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip()


@pytest.mark.parametrize("who", [None, "rogue"], ids=["no-certificate", "other-ca"])
def test_untrusted_clients_are_refused(site: Site, prefix: str, who: str | None) -> None:
    """A client without a certificate, and one whose certificate (with a node's name)
    another CA signed, are refused by the TLS listener: mosquitto_pub fails and stores
    nothing, and `mqinfer status` exits 1 saying why."""
    pub = need_client_tool("mosquitto_pub")
    probe = f"{prefix}/probe"
    out = subprocess.run(
        [pub, *site.tool_tls(who), "-t", probe, "-m", "evil", "-r", "-q", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0, out
    assert _retained_first(site, prefix, probe) == "marker"
    args = ["--tls-ca", site.ca()]
    if who is not None:
        args = site.tls(who, ca="ca")
    res = mqinfer("status", "--broker", f"127.0.0.1:{site.tls_port}", *args, timeout=60)
    assert res.returncode == 1, res
    assert "closed the TLS connection before answering CONNECT" in res.stderr, res.stderr
    assert "client certificate" in res.stderr


def test_the_broker_certificate_must_be_signed_by_the_given_ca(site: Site) -> None:
    """A client that trusts another CA refuses the broker's certificate."""
    res = mqinfer(
        "status",
        "--broker",
        f"127.0.0.1:{site.tls_port}",
        *site.tls("n1", ca="other-ca"),
        timeout=60,
    )
    assert res.returncode == 1, res
    assert "CERTIFICATE_VERIFY_FAILED" in res.stderr, res.stderr


def test_passwords_from_a_file_or_the_environment(
    site: Site, prefix: str, tmp_path: Path, procs: Procs
) -> None:
    """On the password listener: a wrong password file is refused with a clear error
    (exit 3, and a node stops rather than retry); the right one, MQINFER_PASSWORD, and a
    password in the URL (with a warning about `ps`) are let in."""
    plain = f"mqtt://127.0.0.1:{site.broker.port}"
    wrong, right = tmp_path / "wrong.pw", tmp_path / "right.pw"
    wrong.write_text("not the password\n")
    right.write_text(site.password + "\n")
    user = ["--username", site.passwd_user]
    res = mqinfer("status", "--broker", plain, *user, "--password-file", str(wrong), timeout=60)
    assert res.returncode == EXIT_AUTH, res
    assert f"mqtt://{site.passwd_user}@127.0.0.1:{site.broker.port} refused" in res.stderr
    assert "Not authorized" in res.stderr or "Bad user name or password" in res.stderr
    assert "not the password" not in res.stderr + res.stdout

    node = procs.node(site.broker, prefix, "n1", *user, "--password-file", str(wrong), url=plain)
    assert node.proc.wait(60) == EXIT_AUTH
    assert "refused the connection" in node.log()

    res = mqinfer("status", "--broker", plain, *user, "--password-file", str(right), timeout=60)
    assert res.returncode == 0, res
    assert "warning" not in res.stderr

    env = {**os.environ, "MQINFER_USERNAME": site.passwd_user, "MQINFER_PASSWORD": site.password}
    res = subprocess.run(
        [sys.executable, "-m", "mqinfer", "status", "--broker", plain],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert res.returncode == 0, res

    in_url = f"mqtt://{site.passwd_user}:{site.password}@127.0.0.1:{site.broker.port}"
    res = mqinfer("status", "--broker", in_url, timeout=60)
    assert res.returncode == 0, res
    (warning,) = [line for line in res.stderr.splitlines() if "warning" in line]
    assert "visible to other users in `ps`" in warning and "--password-file" in warning
    assert site.password not in res.stderr

    missing = tmp_path / "absent.pw"
    res = mqinfer("status", "--broker", plain, *user, "--password-file", str(missing), timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res
    assert f"password file {missing}: cannot read it" in res.stderr
