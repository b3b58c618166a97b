"""Command-line errors name the option, what was given and what is expected."""

from __future__ import annotations

import pytest

from mqinfer.cli import main


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["node", "--id", "bad id"], {}, "argument --id: invalid node id 'bad id'"),
        (["node"], {"MQINFER_HEARTBEAT": "abc"}, "argument --heartbeat: invalid float value"),
        (["node", "--heartbeat", "0"], {}, "--heartbeat: expected a number of seconds > 0"),
        (["node", "--label", "novalue"], {}, "expected KEY=VALUE, got 'novalue'"),
        (["node", "--broker", "http://x"], {}, "scheme must be mqtt:// or mqtts://"),
        (["status", "--prefix", "$SYS"], {}, "--prefix: invalid topic prefix level '$SYS'"),
        (["coordinator", "--missed-beats", "0.5"], {}, "--missed-beats: expected a number >= 1"),
        (["coordinator", "--id", "a/b"], {}, "invalid coordinator id 'a/b'"),
        (["broker", "--port", "70000"], {}, "70000"),
    ],
)
def test_usage_errors(
    argv: list[str],
    env: dict[str, str],
    says: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert says in capsys.readouterr().err
