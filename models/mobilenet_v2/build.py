"""Build MobileNetV2-sized image models with random weights, for benchmarks only.

    /tmp/modelbuild/bin/python models/mobilenet_v2/build.py     (from the repository root)

``tf.keras.applications.MobileNetV2(input_shape=(224, 224, 3), alpha=ALPHA, weights=None,
classes=1000)`` with weights drawn from a fixed seed (no download: ``weights=None``),
converted twice, each file with its manifest beside it:

- ``mobilenet_v2_int8.tflite``: full-integer quantized Coral style: uint8 input that takes
  the raw 0..255 RGB pixels (the representative data are uniform random images in
  MobileNetV2's [-1, 1] input range, so the input quantization maps pixel p to about
  p / 127.5 - 1), uint8 softmax output [1, 1000].
- ``mobilenet_v2_f32.tflite``: the same Keras model converted without quantization: float32
  input [1, 224, 224, 3] taking (pixel - 127.5) / 127.5, float32 softmax output [1, 1000].
  It exists for compute-bound benchmarks: with LiteRT (XNNPACK) on x86 an invoke takes
  about twice as long as with the int8 file (models/README.md has the figures).

They have the operators, tensor sizes and cost of a real MobileNetV2 but predict nothing
useful: use them to measure latency, throughput and provisioning, never accuracy.

Determinism: the int8 file is converted first, exactly as before the f32 file was added,
and stays byte-identical. Three builds on one machine, two of them in separately installed
venvs from models/requirements-build.txt, wrote byte-identical int8 files; two builds
wrote byte-identical f32 files.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import buildlib

HERE = Path(__file__).resolve().parent
SEED = 0
ALPHA = 1.0
REPRESENTATIVE_IMAGES = 16


def main() -> None:
    started = time.monotonic()
    random.seed(SEED)
    np.random.seed(SEED)

    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(SEED)

    # batch_size=1 gives the converted file a fixed input shape [1, 224, 224, 3].
    model = keras.applications.MobileNetV2(
        input_shape=(224, 224, 3),
        alpha=ALPHA,
        weights=None,
        classes=1000,
        input_tensor=keras.Input((224, 224, 3), batch_size=1, name="image"),
    )
    rng = np.random.default_rng(SEED)
    calibration = rng.uniform(-1.0, 1.0, (REPRESENTATIVE_IMAGES, 1, 224, 224, 3))

    def representative() -> Any:
        for image in calibration.astype(np.float32):
            yield [image]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    _write(
        HERE / "mobilenet_v2_int8.tflite",
        converter.convert(),
        name="mobilenet-v2-int8",
        preprocessing={
            "mode": "RGB",
            "size": [224, 224],
            "layout": "NHWC",
            "pixels": True,
            "mean": 0.0,
            "std": 255.0,
        },
        kind=(
            "Full-integer quantized, uint8 input taking raw pixels, uint8 output (Edge TPU style)."
        ),
    )

    # After the int8 file, so adding it left the int8 conversion exactly as it was.
    _write(
        HERE / "mobilenet_v2_f32.tflite",
        tf.lite.TFLiteConverter.from_keras_model(model).convert(),
        name="mobilenet-v2-f32",
        preprocessing={
            "mode": "RGB",
            "size": [224, 224],
            "layout": "NHWC",
            "pixels": False,
            "mean": 127.5,
            "std": 127.5,
        },
        kind=(
            "Float32, not quantized: input (pixel - 127.5) / 127.5 in [-1, 1], float32 "
            "output; for compute-bound benchmarks."
        ),
    )
    print(f"built in {time.monotonic() - started:.0f} s")


def _write(
    path: Path, model: bytes, *, name: str, preprocessing: dict[str, Any], kind: str
) -> None:
    """Write one converted model and its manifest, read back from the written file."""
    path.write_bytes(model)
    manifest: dict[str, Any] = {
        "name": name,
        **buildlib.describe(path, "tflite"),
        "preprocessing": preprocessing,
        "labels": [],
        "accuracy": None,
        "test_set": None,
        "description": (
            f"MobileNetV2 (alpha {ALPHA}, 224x224 RGB, 1000 classes) with RANDOM weights "
            f"(fixed seed), for benchmarks only: its outputs mean nothing. {kind} "
            "Built by models/mobilenet_v2/build.py."
        ),
    }
    buildlib.write_manifest(path, manifest)
    print(f"{path.name} {manifest['size']} B  sha256 {manifest['sha256'][:16]}")


if __name__ == "__main__":
    main()
