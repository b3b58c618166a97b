"""Credentials and TLS files from the options and the environment: which one wins, the
errors for what is missing or wrong, and the warning for a password in the URL."""

from __future__ import annotations

import argparse
import re
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from mqinfer import options
from mqinfer.mqtt import BrokerURL
from mqinfer.mqtt.url import TLSFileError, TLSFiles


def parse(*argv: str) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="mqinfer test")
    options.add_common(p)
    return p, p.parse_args(list(argv))


def creds(*argv: str, env: dict[str, str] | None = None) -> options.Credentials:
    return options.credentials(parse(*argv)[1], env or {})


def urls(*argv: str, env: dict[str, str] | None = None) -> tuple[list[BrokerURL], list[str]]:
    """The broker URLs and the warnings printed for them."""
    warnings: list[str] = []
    _, args = parse(*argv)
    environ = env or {}
    got = options.brokers(args, environ, options.credentials(args, environ), warnings.append)
    return got, warnings


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a client certificate and key signed by it, another key, an encrypted key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")

    def run(command: str) -> None:
        subprocess.run([openssl, *command.split()], cwd=d, check=True, capture_output=True)

    run("req -x509 -newkey rsa:2048 -nodes -days 2 -keyout ca.key -out ca.pem -subj /CN=ca")
    run("req -new -newkey rsa:2048 -nodes -keyout n1.key -out n1.csr -subj /CN=n1")
    run("x509 -req -in n1.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -out n1.pem")
    run("genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out other.key")
    run("pkey -in n1.key -aes256 -passout pass:secret -out encrypted.key")
    return d


# ---- passwords -------------------------------------------------------------------


def test_password_file_first_line_without_its_line_ending(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_bytes(b"s3cret with spaces \r\nsecond line\n")
    assert creds("--username", "u", "--password-file", str(f)).password == "s3cret with spaces "


def test_option_beats_environment(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("from-option\n")
    b.write_text("from-env-file\n")
    env = {"MQINFER_PASSWORD_FILE": str(b), "MQINFER_USERNAME": "env-user"}
    c = creds("--username", "opt-user", "--password-file", str(a), env=env)
    assert (c.username, c.password) == ("opt-user", "from-option")
    c = creds("--password-file", str(a), env={"MQINFER_PASSWORD": "plain", **env})
    assert (c.username, c.password) == ("env-user", "from-option")
    c = creds(env=env)
    assert (c.username, c.password) == ("env-user", "from-env-file")
    assert creds(env={"MQINFER_PASSWORD": "plain"}).password == "plain"
    assert creds() == options.Credentials()


def test_both_password_variables_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("x\n")
    with pytest.raises(ValueError, match="MQINFER_PASSWORD and MQINFER_PASSWORD_FILE are both"):
        creds(env={"MQINFER_PASSWORD": "x", "MQINFER_PASSWORD_FILE": str(f)})


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read it: No such file or directory"),
        (b"", "empty (expected the password on its first line)"),
        (b"\nsecond\n", "empty (expected the password on its first line)"),
        (b"\xff\xfe\n", "not UTF-8 text"),
    ],
)
def test_bad_password_file_names_the_file(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    f = tmp_path / "pw"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(ValueError) as e:
        creds("--username", "u", "--password-file", str(f))
    assert str(e.value) == f"password file {f}: {expected}"


def test_a_password_needs_a_user_name() -> None:
    with pytest.raises(ValueError, match=r"a password needs a user name .*--username NAME"):
        urls("--broker", "mqtt://h:1883", env={"MQINFER_PASSWORD": "x"})
    got, _ = urls("--broker", "mqtt://u@h:1883", env={"MQINFER_PASSWORD": "x"})
    assert (got[0].username, got[0].password) == ("u", "x")


def test_credentials_apply_to_every_member_of_a_cluster(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("pw\n")
    got, warnings = urls(
        "--broker", "mqtt://a:1883,mqtt://b:1884", "--username", "n1", "--password-file", str(f)
    )
    assert [(u.host, u.username, u.password) for u in got] == [
        ("a", "n1", "pw"),
        ("b", "n1", "pw"),
    ]
    assert warnings == []


# ---- a password in the URL -------------------------------------------------------


def test_password_in_broker_option_warns_once_per_url_without_showing_it() -> None:
    got, warnings = urls("--broker", "mqtt://u:hunter2@h:1883")
    assert (got[0].username, got[0].password) == ("u", "hunter2")
    assert warnings == [
        "the password in --broker mqtt://u@h:1883 is visible to other users in `ps`; use "
        "--password-file FILE, MQINFER_PASSWORD_FILE or MQINFER_PASSWORD"
    ]


def test_password_in_the_environment_url_does_not_warn() -> None:
    got, warnings = urls(env={"MQINFER_BROKER": "mqtt://u:hunter2@h:1883"})
    assert got[0].password == "hunter2" and warnings == []


def test_resolve_prints_the_warning_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    p, args = parse("--broker", "mqtt://u:hunter2@h:1883")
    options.resolve(p, args)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mqinfer test: warning: the password in")
    assert "hunter2" not in err


def test_password_given_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="the password is given twice: in --broker mqtt://u@h"):
        urls("--broker", "mqtt://u:p@h:1883", env={"MQINFER_PASSWORD": "q"})


def test_two_different_user_names_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"two user names: 'a' in --broker .* and 'b'"):
        urls("--broker", "mqtt://a@h", "--username", "b")
    got, _ = urls("--broker", "mqtt://a@h", "--username", "a")
    assert got[0].username == "a"


def test_the_password_is_not_in_repr_or_url_errors() -> None:
    assert "hunter2" not in repr(BrokerURL.parse("mqtt://u:hunter2@h:1883"))
    with pytest.raises(ValueError) as e:
        BrokerURL.parse("mqtt://u:hunter2@h:notaport")
    assert "hunter2" not in str(e.value) and "u:***@h" in str(e.value)


# ---- TLS ---------------------------------------------------------------------------


def tls(pki: Path, who: str = "n1", key: str | None = None) -> list[str]:
    return [
        "--tls-ca",
        str(pki / "ca.pem"),
        "--tls-cert",
        str(pki / f"{who}.pem"),
        "--tls-key",
        str(pki / (key or f"{who}.key")),
    ]


def test_tls_options_make_a_url_without_scheme_mqtts(pki: Path) -> None:
    got, warnings = urls("--broker", "h", *tls(pki))
    assert (got[0].tls, got[0].port, warnings) == (True, 8883, [])
    assert got[0].tls_files == TLSFiles(
        str(pki / "ca.pem"), str(pki / "n1.pem"), str(pki / "n1.key")
    )
    got, _ = urls("--broker", "h:18883", "--tls-ca", str(pki / "ca.pem"))
    assert (got[0].tls, got[0].port, got[0].tls_files.cert) == (True, 18883, None)
    got, _ = urls(*tls(pki))  # the default broker, over TLS
    assert str(got[0]) == "mqtts://127.0.0.1:8883"
    got, _ = urls()
    assert str(got[0]) == "mqtt://127.0.0.1:1883" and got[0].tls_files == TLSFiles()


def test_plain_scheme_in_the_url_wins_with_a_warning(pki: Path) -> None:
    got, warnings = urls("--broker", "mqtt://h:1883", *tls(pki))
    assert (got[0].tls, got[0].tls_files) == (False, TLSFiles())
    assert warnings == [
        "mqtt://h:1883 asks for plain MQTT, so the --tls-* options are not used for it; "
        "write mqtts:// (or leave out the scheme) to connect over TLS"
    ]


def test_tls_environment_and_option_precedence(pki: Path) -> None:
    env = {
        "MQINFER_TLS_CA": str(pki / "ca.pem"),
        "MQINFER_TLS_CERT": str(pki / "n1.pem"),
        "MQINFER_TLS_KEY": str(pki / "n1.key"),
    }
    assert creds(env=env).tls_files == TLSFiles(*env.values())
    c = creds("--tls-ca", str(pki / "n1.pem"), env=env)  # any PEM certificate is a CA file
    assert c.tls_files == TLSFiles(
        str(pki / "n1.pem"), env["MQINFER_TLS_CERT"], env["MQINFER_TLS_KEY"]
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert", "c.pem"], "--tls-cert needs --tls-key (or MQINFER_TLS_KEY)"),
        (["--tls-key", "k.pem"], "--tls-key needs --tls-cert (or MQINFER_TLS_CERT)"),
    ],
)
def test_a_certificate_and_its_key_go_together(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        creds(*argv)


def test_unreadable_tls_files_name_the_file(pki: Path, tmp_path: Path) -> None:
    missing = tmp_path / "absent.pem"
    with pytest.raises(ValueError) as e:
        creds("--tls-ca", str(missing))
    assert str(e.value) == f"TLS: CA file {missing}: cannot read it: No such file or directory"
    with pytest.raises(ValueError) as e:
        creds("--tls-cert", str(pki / "n1.pem"), "--tls-key", str(missing))
    assert str(e.value) == f"TLS: client key {missing}: cannot read it: No such file or directory"
    with pytest.raises(
        ValueError, match=re.escape(f"CA file {pki / 'n1.key'}: no usable PEM certificate")
    ):
        creds("--tls-ca", str(pki / "n1.key"))


def test_a_key_of_another_certificate_is_refused(pki: Path) -> None:
    with pytest.raises(ValueError, match="the key does not belong to the certificate"):
        creds(*tls(pki, key="other.key"))


def test_an_encrypted_key_is_refused_without_a_prompt(pki: Path) -> None:
    with pytest.raises(ValueError, match=r"encrypted\.key is encrypted with a passphrase"):
        creds(*tls(pki, key="encrypted.key"))


def test_resolve_turns_a_tls_error_into_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p, args = parse("--tls-ca", str(tmp_path / "absent.pem"))
    with pytest.raises(SystemExit) as e:
        options.resolve(p, args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"mqinfer test: error: TLS: CA file {tmp_path / 'absent.pem'}: cannot read" in err
    assert "Traceback" not in err


def test_the_context_trusts_the_given_ca_and_presents_the_certificate(pki: Path) -> None:
    context = TLSFiles(str(pki / "ca.pem"), str(pki / "n1.pem"), str(pki / "n1.key")).context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    subjects = [dict(x[0] for x in c["subject"]) for c in context.get_ca_certs()]
    assert subjects == [{"commonName": "ca"}]


def test_the_context_checks_its_files_each_time(pki: Path, tmp_path: Path) -> None:
    """Read at each connection: a file gone since the start is an error naming it."""
    cert = tmp_path / "n1.pem"
    cert.write_bytes((pki / "n1.pem").read_bytes())
    files = TLSFiles(str(pki / "ca.pem"), str(cert), str(pki / "n1.key"))
    files.context()
    cert.unlink()
    with pytest.raises(TLSFileError, match=re.escape(f"client certificate {cert}: cannot read it")):
        files.context()
