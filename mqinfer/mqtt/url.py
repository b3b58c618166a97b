"""Where the broker is: one URL, or several members of a clustered broker to fail over
between."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import unquote, urlsplit

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        """Parse mqtt://[user[:pass]@]host[:port] or mqtts://...; raise ValueError if wrong."""
        url = url.strip()
        if "://" not in url:
            url = "mqtt://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(
                f"broker URL {url!r}: scheme must be mqtt:// or mqtts://, got {parts.scheme!r}"
            )
        if not parts.hostname:
            raise ValueError(f"broker URL {url!r}: no host (expected mqtt://HOST:PORT)")
        if parts.path not in ("", "/"):
            raise ValueError(f"broker URL {url!r}: unexpected path {parts.path!r}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"broker URL {url!r}: port must be a number 1-65535") from None
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


def parse_brokers(values: str | Iterable[str]) -> list[BrokerURL]:
    """One or more broker URLs: a list, or one string with URLs separated by commas
    (`--broker` repeated, or MQINFER_BROKER="mqtt://a:1883,mqtt://b:1883")."""
    texts = [values] if isinstance(values, str) else list(values)
    urls = [BrokerURL.parse(part) for text in texts for part in text.split(",") if part.strip()]
    if not urls:
        raise ValueError("no broker URL given (expected mqtt://HOST:PORT)")
    return urls
