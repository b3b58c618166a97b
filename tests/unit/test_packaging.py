"""What an installed package carries and needs: the demo's model inside it, runtimes as
extras, and a node that announces only the runtimes that import.

Runtimes are hidden from a fresh interpreter by a `sys.meta_path` finder that refuses to
import them, the same as a machine that installed mqinfer without that extra.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

from mqinfer.demo import as_directory, packaged_digits
from mqinfer.servicefile import load_spec_file

REPO = Path("/work/main")
DIGITS = REPO / "models" / "digits"
SHIPPED = ["service.yaml", "digits_int8.tflite", "digits_int8.json"]
RUNTIME_PACKAGES = ("ai_edge_litert", "tflite_runtime", "onnxruntime", "onnx", "openvino")

# Put in front of every other finder: importing a hidden package (or anything in it) fails
# as it does where the package is not installed.
HIDE = textwrap.dedent(
    """
    import sys

    class Hide:
        def __init__(self, names):
            self.names = set(names)

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide(sys.argv[1].split(",") if sys.argv[1] else []))
    """
)


def run_hidden(hidden: tuple[str, ...], code: str) -> str:
    """Run `code` in a fresh interpreter with the `hidden` packages not importable."""
    out = subprocess.run(
        [sys.executable, "-c", HIDE + textwrap.dedent(code), ",".join(hidden)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ---- the demo's model, inside the package ----------------------------------------------


def test_packaged_demo_model_is_models_digits_byte_for_byte() -> None:
    """The package ships the files of models/digits that the demo needs, unchanged."""
    found = packaged_digits()
    for name in SHIPPED:
        assert found.joinpath(name).read_bytes() == (DIGITS / name).read_bytes(), name
    samples = sorted(p.name for p in (DIGITS / "samples").iterdir())
    assert len(samples) == 5
    shipped = sorted(p.name for p in found.joinpath("samples").iterdir())
    assert shipped == samples
    for name in samples:
        expect = (DIGITS / "samples" / name).read_bytes()
        assert found.joinpath("samples", name).read_bytes() == expect, name


def test_package_data_names_every_file_the_demo_reads() -> None:
    """pyproject.toml's package-data lists the files the demo reads, so that the wheel
    carries them (the wheel test checks the wheel itself)."""
    data = pyproject()["tool"]["setuptools"]["package-data"]  # type: ignore[index]
    assert sorted(data["mqinfer.demo_models.digits"]) == sorted(SHIPPED)
    assert data["mqinfer.demo_models.digits.samples"] == ["*.png"]
    packages = pyproject()["tool"]["setuptools"]["packages"]  # type: ignore[index]
    assert "mqinfer.demo_models.digits" in packages
    assert "mqinfer.demo_models.digits.samples" in packages


def test_packaged_digits_service_loads_with_its_manifest() -> None:
    with as_directory(packaged_digits()) as digits:
        spec, model = load_spec_file(digits / "service.yaml")
    assert spec.name == "digits"
    assert model.format == "tflite"
    assert model.manifest is not None
    assert model.manifest.sha256 == model.sha256


def test_packaged_directory_is_copied_out_of_an_archive(tmp_path: Path) -> None:
    """A package imported from a zip file is not on disk: the demo's files are copied out
    to a temporary directory, unchanged, and removed afterwards."""
    archive = tmp_path / "site.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(DIGITS.rglob("*")):
            if path.is_file() and (path.name in SHIPPED or path.parent.name == "samples"):
                z.write(path, f"mqinfer/demo_models/digits/{path.relative_to(DIGITS)}")
    inside = zipfile.Path(archive, "mqinfer/demo_models/digits/")
    with as_directory(inside) as copied:
        assert copied.is_dir()
        assert copied != DIGITS
        for name in SHIPPED:
            assert (copied / name).read_bytes() == (DIGITS / name).read_bytes()
        assert sorted(p.name for p in (copied / "samples").iterdir()) == sorted(
            p.name for p in (DIGITS / "samples").iterdir()
        )
        spec, model = load_spec_file(copied / "service.yaml")
        assert spec.name == "digits"
        assert model.manifest is not None and model.manifest.sha256 == model.sha256
    assert not copied.exists()


# ---- runtimes are extras -----------------------------------------------------------------


def test_runtimes_are_extras_not_dependencies() -> None:
    project = pyproject()["project"]
    base = {
        re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower()
        for d in project["dependencies"]  # type: ignore[index]
    }
    assert "numpy" in base
    assert not base & {"ai-edge-litert", "tflite-runtime", "onnxruntime", "onnx"}
    extras = project["optional-dependencies"]  # type: ignore[index]
    assert extras["litert"] == ["ai-edge-litert>=2.0"]
    assert extras["onnx"] == ["onnxruntime>=1.17"]
    assert "onnx>=1.16" in extras["split"]
    assert "mqinfer[all]" in extras["dev"]  # `make test` runs everything


def test_the_command_line_imports_no_runtime() -> None:
    """`mqinfer --help`, `broker` and `coordinator` work on a base install: importing the
    whole command line (every subcommand) loads no runtime package."""
    out = run_hidden(
        (),
        """
        import sys
        import mqinfer.cli
        import mqinfer.cli.broker, mqinfer.cli.coordinator, mqinfer.cli.node
        import mqinfer.demo, mqinfer.split
        top = {m.partition(".")[0] for m in sys.modules}
        runtimes = {"ai_edge_litert", "tflite_runtime", "onnxruntime", "onnx", "openvino"}
        print(",".join(sorted(top & runtimes)))
        """,
    )
    assert out.strip() == ""


def test_help_broker_and_coordinator_parse_without_any_runtime() -> None:
    out = run_hidden(
        RUNTIME_PACKAGES,
        """
        import contextlib, io
        from mqinfer.cli import main, parser
        p = parser()
        for argv in (["broker", "--port", "1"], ["coordinator", "--id", "c"], ["node"]):
            args = p.parse_args(argv)
            print(argv[0], args.func.__module__)
        with contextlib.redirect_stdout(io.StringIO()) as text:
            try:
                main(["--help"])
            except SystemExit as e:
                code = e.code
        print("help", code, "COMMAND" in text.getvalue())
        """,
    )
    lines = out.splitlines()
    assert lines[0] == "broker mqinfer.cli.broker"
    assert lines[1].startswith("coordinator mqinfer.")
    assert lines[2] == "node mqinfer.cli.node"
    assert lines[3] == "help 0 True"


PROBE = """
import json
from mqinfer.node.capabilities import capabilities, probe_host, probe_runtimes
from mqinfer.node.runtimes import available_backends
caps = capabilities("n1", 1, probe_runtimes(), probe_host())
wire = json.loads(caps.model_dump_json())
print(json.dumps({
    "runtimes": sorted(wire["runtimes"]),
    "formats": wire["formats"],
    "absent": wire["absent"],
    "cpu": [a["runtime"] for a in wire["accelerators"] if a["kind"] == "cpu"],
    "backends": sorted(available_backends()),
}))
"""


def probe(hidden: tuple[str, ...]) -> dict[str, object]:
    result: dict[str, object] = json.loads(run_hidden(hidden, PROBE).strip().splitlines()[-1])
    return result


def test_node_announces_both_runtimes_when_both_import() -> None:
    """The control for the tests below: this environment (`.[dev]`) has LiteRT and ONNX
    Runtime, and OpenVINO where `[openvino]` was installed too."""
    found = probe(())
    openvino = importlib.util.find_spec("openvino") is not None
    assert found["runtimes"] == ["litert", "onnxruntime"] + (["openvino"] if openvino else [])
    assert found["formats"] == ["tflite", "onnx"]
    assert found["backends"] == ["onnx", "tflite"]


def test_node_without_litert_announces_only_onnxruntime() -> None:
    found = probe(("ai_edge_litert", "tflite_runtime", "openvino"))
    assert found["runtimes"] == ["onnxruntime"]
    assert found["formats"] == ["onnx"]
    assert found["cpu"] == ["onnxruntime"]
    assert found["backends"] == ["onnx"]
    absent = found["absent"]
    assert isinstance(absent, dict)
    assert "No module named 'ai_edge_litert" in absent["litert"]
    assert "No module named 'tflite_runtime" in absent["tflite_runtime"]


def test_node_without_onnxruntime_announces_only_litert() -> None:
    found = probe(("onnxruntime", "openvino"))
    assert found["runtimes"] == ["litert"]
    assert found["formats"] == ["tflite"]
    assert found["cpu"] == ["litert"]
    assert found["backends"] == ["tflite"]
    absent = found["absent"]
    assert isinstance(absent, dict)
    assert "No module named 'onnxruntime'" in absent["onnxruntime"]
    assert absent["gpu"].startswith("onnxruntime does not import")


def test_node_with_no_runtime_announces_none() -> None:
    found = probe(RUNTIME_PACKAGES)
    assert found["runtimes"] == []
    assert found["formats"] == []
    assert found["backends"] == []
    assert found["cpu"] == [""]


@pytest.mark.parametrize(
    ("model", "hidden", "extra"),
    [
        ("digits_int8.tflite", ("ai_edge_litert", "tflite_runtime", "openvino"), "litert"),
        ("digits.onnx", ("onnx",), "split"),
        ("digits.onnx", ("onnxruntime", "openvino"), "split"),
    ],
)
def test_split_names_the_extra_to_install(
    model: str, hidden: tuple[str, ...], extra: str, tmp_path: Path
) -> None:
    """`mqinfer split` without what it needs exits 2 and says which extra installs it."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            HIDE + "from mqinfer.cli import main\nraise SystemExit(main(sys.argv[2:]))",
            ",".join(hidden),
            "split",
            str(DIGITS / model),
            "--segments",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 2, out.stderr
    assert f"pip install 'mqinfer[{extra}]'" in out.stderr
    assert out.stderr.startswith("mqinfer split: ")
    assert "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []
