"""`mqinfer accounts`: the ACL each role gets, the password file, the kept secrets."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from mqinfer.accounts import Site, acl_text, password_hash, write

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = Site(
    nodes=["edge-01", "edge-02"], sensors=["cam-1"], operators=["deployer"], observers=["dashboard"]
)


def blocks(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    user = ""
    for line in text.splitlines():
        if line.startswith("user "):
            user = line.split()[1]
            out[user] = []
        elif line.startswith("topic "):
            out[user].append(line)
    return out


def test_the_shipped_example_is_what_the_command_writes() -> None:
    assert (REPO / "deploy/mosquitto/acl.example").read_text().endswith(acl_text(EXAMPLE))


def test_no_account_gets_a_rule_meant_for_another() -> None:
    text = acl_text(EXAMPLE)
    assert "pattern" not in [line.split()[0] for line in text.splitlines() if line.strip()]
    rules = blocks(text)
    assert set(rules) == {"coordinator", "edge-01", "edge-02", "cam-1", "deployer", "dashboard"}
    node = rules["edge-01"]
    assert all("/nodes/edge-02" not in r for r in node)
    assert not [r for r in node if "request" in r or "result" in r or "replies" in r]
    assert "topic read mqinfer/nodes/edge-01/work" in node
    sensor = rules["cam-1"]
    assert "topic read mqinfer/replies/cam-1/#" in sensor
    assert not [r for r in sensor if "result" in r or "/nodes/" in r or "artifacts" in r]
    assert all(r.startswith("topic read") for r in rules["dashboard"])
    assert not [r for r in rules["dashboard"] if "request" in r or "replies" in r]
    writes = {r.split()[2] for r in rules["deployer"] if r.split()[1] in ("write", "readwrite")}
    assert writes == {"mqinfer/services/+/spec", "mqinfer/artifacts/#"}


def test_options_widen_sensors_and_nodes_only_when_asked() -> None:
    site = Site(nodes=["n1"], sensors=["s1"], shared_results=True, site_fallback=True)
    rules = blocks(acl_text(site))
    assert "topic read mqinfer/services/+/result/#" in rules["s1"]
    assert "topic read mqinfer/services/+/request/#" in rules["n1"]
    other = blocks(acl_text(Site(prefix="a/b", nodes=["n1"])))
    assert all(" a/b/" in r for r in other["n1"])


@pytest.mark.parametrize(
    ("site", "says"),
    [
        (Site(nodes=["x"], sensors=["x"]), "named as node and as sensor"),
        (Site(nodes=["coordinator"]), "named as coordinator and as node"),
        (Site(nodes=["a/b"]), "invalid node name"),
        (Site(prefix="a/+"), "invalid topic prefix level"),
    ],
)
def test_bad_sites_are_refused_naming_the_problem(site: Site, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        acl_text(site)


def test_password_hash_is_mosquittos_pbkdf2_sha512() -> None:
    salt = bytes(range(12))
    kind, iterations, b64salt, b64hash = password_hash("pw", salt).split("$")[1:]
    assert (kind, iterations) == ("7", "101")
    assert base64.b64decode(b64salt) == salt
    assert base64.b64decode(b64hash) == hashlib.pbkdf2_hmac("sha512", b"pw", salt, 101)
    assert password_hash("pw") != password_hash("pw")  # a new salt each time


def test_secrets_are_private_and_kept_when_accounts_are_added(tmp_path: Path) -> None:
    write(Site(nodes=["n1"]), tmp_path)
    first = (tmp_path / "secrets" / "n1").read_text()
    write(Site(nodes=["n1", "n2"]), tmp_path)
    assert (tmp_path / "secrets" / "n1").read_text() == first
    for path in (tmp_path / "secrets" / "n2", tmp_path / "mqinfer.passwd"):
        assert path.stat().st_mode & 0o777 == 0o600
    users = [line.split(":")[0] for line in (tmp_path / "mqinfer.passwd").read_text().split()]
    assert users == ["coordinator", "n1", "n2"]
