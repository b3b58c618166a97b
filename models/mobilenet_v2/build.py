"""Build a MobileNetV2-sized image model with random weights, for benchmarks only.

    /tmp/modelbuild/bin/python models/mobilenet_v2/build.py     (from the repository root)

``tf.keras.applications.MobileNetV2(input_shape=(224, 224, 3), alpha=ALPHA, weights=None,
classes=1000)`` with weights drawn from a fixed seed (no download: ``weights=None``),
full-integer quantized Coral style: uint8 input that takes the raw 0..255 RGB pixels (the
representative data are uniform random images in MobileNetV2's [-1, 1] input range, so the
input quantization maps pixel p to about p / 127.5 - 1), uint8 softmax output [1, 1000].

It has the operators, tensor sizes and cost of a real MobileNetV2 but predicts nothing
useful: use it to measure latency, throughput and provisioning, never accuracy.

Determinism: three builds on one machine, two of them in separately installed venvs from
models/requirements-build.txt, wrote byte-identical files.
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
    path = HERE / "mobilenet_v2_int8.tflite"
    path.write_bytes(converter.convert())

    manifest: dict[str, Any] = {
        "name": "mobilenet-v2-int8",
        **buildlib.describe(path, "tflite"),
        "preprocessing": {
            "mode": "RGB",
            "size": [224, 224],
            "layout": "NHWC",
            "pixels": True,
            "mean": 0.0,
            "std": 255.0,
        },
        "labels": [],
        "accuracy": None,
        "test_set": None,
        "description": (
            f"MobileNetV2 (alpha {ALPHA}, 224x224 RGB, 1000 classes) with RANDOM weights "
            "(fixed seed), for benchmarks only: its outputs mean nothing. Full-integer "
            "quantized, uint8 input taking raw pixels, uint8 output (Edge TPU style). "
            "Built by models/mobilenet_v2/build.py."
        ),
    }
    buildlib.write_manifest(path, manifest)
    print(f"{path.name} {manifest['size']} B  sha256 {manifest['sha256'][:16]}")
    print(f"built in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
