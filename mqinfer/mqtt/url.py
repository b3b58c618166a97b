"""Where the broker is and how to prove who we are to it: one URL, or several members of a
clustered broker to fail over between, with the credentials and TLS files for them."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypeAlias
from urllib.parse import unquote, urlsplit

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


class TLSFileError(ValueError):
    """A TLS file that cannot be read or used; the message names the file."""


@dataclass(frozen=True)
class TLSFiles:
    """The files of a TLS connection: the CA certificates that sign the broker's certificate
    (None: the system's), and the client certificate chain with its key (mutual TLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def context(self) -> ssl.SSLContext:
        """An SSL context that checks the broker's certificate and host name and presents
        the client certificate, from the files as they are now (each new session's
        connection reads them again). Raise TLSFileError naming the file that is missing,
        unreadable or wrong."""
        if (self.cert is None) != (self.key is None):
            raise TLSFileError(
                "a client certificate needs its key and a key its certificate "
                f"(certificate: {self.cert or 'none'}, key: {self.key or 'none'})"
            )
        for what, path in (("CA file", self.ca), ("client certificate", self.cert)):
            if path is not None:
                _check_readable(what, path)
        if self.key is not None:
            _check_readable("client key", self.key)
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        except ssl.SSLError as e:
            raise TLSFileError(
                f"CA file {self.ca}: no usable PEM certificate in it ({e.reason or e})"
            ) from None
        if self.cert is not None:
            try:
                context.load_cert_chain(self.cert, self.key, password=_encrypted(self.key))
            except ssl.SSLError as e:
                raise TLSFileError(
                    f"client certificate {self.cert} with key {self.key}: "
                    f"{_explain(e)} (expected a PEM certificate and its unencrypted PEM key)"
                ) from None
        return context


def _check_readable(what: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise TLSFileError(f"{what} {path}: cannot read it: {e.strerror or e}") from None


def _encrypted(key: str | None) -> Callable[[], bytes]:
    """The password callback: never prompt on the terminal for an encrypted key."""

    def refuse() -> NoReturn:
        raise TLSFileError(
            f"client key {key} is encrypted with a passphrase; give an unencrypted key "
            "readable by this user only (openssl pkey -in KEY -out PLAIN.key)"
        )

    return refuse


def _explain(e: ssl.SSLError) -> str:
    if e.reason == "KEY_VALUES_MISMATCH":
        return "the key does not belong to the certificate"
    if e.reason is None or e.reason == "PEM lib":  # OpenSSL could not decode the PEM
        return "a file is not in PEM form, or holds no certificate or key"
    return str(e.reason)


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_files: TLSFiles = TLSFiles()

    @classmethod
    def parse(cls, url: str, tls_default: bool = False) -> BrokerURL:
        """Parse mqtt://[user[:pass]@]host[:port] or mqtts://...; raise ValueError if wrong.
        A URL without a scheme is mqtts:// when `tls_default` (TLS files were given)."""
        url = url.strip()
        if "://" not in url:
            url = ("mqtts://" if tls_default else "mqtt://") + url
        parts = urlsplit(url)
        shown = url.replace(f":{parts.password}@", ":***@", 1) if parts.password else url
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(
                f"broker URL {shown!r}: scheme must be mqtt:// or mqtts://, got {parts.scheme!r}"
            )
        if not parts.hostname:
            raise ValueError(f"broker URL {shown!r}: no host (expected mqtt://HOST:PORT)")
        if parts.path not in ("", "/"):
            raise ValueError(f"broker URL {shown!r}: unexpected path {parts.path!r}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"broker URL {shown!r}: port must be a number 1-65535") from None
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
        )

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


# One broker, or the members of a clustered broker (tried in turn).
Brokers: TypeAlias = BrokerURL | Sequence[BrokerURL]


def parse_brokers(values: str | Iterable[str], tls_default: bool = False) -> list[BrokerURL]:
    """One or more broker URLs: a list, or one string with URLs separated by commas
    (`--broker` repeated, or MQINFER_BROKER="mqtt://a:1883,mqtt://b:1883")."""
    texts = [values] if isinstance(values, str) else list(values)
    urls = [
        BrokerURL.parse(part, tls_default)
        for text in texts
        for part in text.split(",")
        if part.strip()
    ]
    if not urls:
        raise ValueError("no broker URL given (expected mqtt://HOST:PORT)")
    return urls
