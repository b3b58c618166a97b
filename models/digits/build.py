"""Build the digits classifiers, their held-out data and their manifests.

    /tmp/modelbuild/bin/python models/digits/build.py     (from the repository root)

Data: scikit-learn's ``load_digits`` (ships with the package), 1797 images of 8x8 pixels
valued 0..16, turned into uint8 pixels with ``round(v * 255 / 16)``, and split once with
``train_test_split(test_size=0.2, random_state=0, stratify=labels)``: 1437 images to train
on, 360 held out in ``digits_test.npz``.

Models (all trained on the same 1437 images, never on the held-out ones):

- ``digits_f32.tflite``: a small Keras CNN, float32 input [1, 8, 8, 1] = pixel / 255,
  softmax float32 output [1, 10].
- ``digits_int8.tflite``: the same Keras model, full-integer quantized with the training
  images as representative data; int8 input with scale 1/255 and zero point -128
  (q = pixel - 128), int8 output.
- ``digits.onnx``: the same architecture trained separately in PyTorch (layout NCHW,
  input [1, 1, 8, 8] = pixel / 255), exported to a single-file ONNX model.

Every manifest's tensors are read back with LiteRT / ONNX Runtime and its accuracy is
measured by running the written file on ``digits_test.npz``, preprocessed as the manifest
says.

Determinism: seeds for Python, NumPy, TensorFlow and PyTorch, TensorFlow op determinism and
one thread in both frameworks. Three builds on one machine (x86_64, 2 cores), two of them in
separately installed venvs from models/requirements-build.txt, wrote byte-identical files
(every model, manifest, the .npz and the PNGs had the same sha256) with the same accuracies
(f32 and int8 352/360, onnx 355/360). A different CPU or library version may change the
trained weights, and with them the hashes and possibly the last digit of an accuracy.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import buildlib

HERE = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 60
BATCH = 32
LABELS = [str(d) for d in range(10)]
SAMPLES = (0, 3, 5, 7, 8)  # one PNG for the first held-out image of each of these digits
DATASET = "scikit-learn load_digits, held-out split (digits_test.npz)"


def seed_everything() -> None:
    random.seed(SEED)
    np.random.seed(SEED)


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 pixels [N, 8, 8] and int64 labels, split into train and held-out test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        pixels, labels, test_size=0.2, random_state=0, stratify=labels
    )
    return x_train, y_train, x_test, y_test


# --- Keras / TFLite -------------------------------------------------------------------


def keras_model(batch_size: int | None) -> Any:
    import keras

    inputs = keras.Input((8, 8, 1), batch_size=batch_size, name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.3)(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="digits")


def build_tflite(x_train: np.ndarray, y_train: np.ndarray) -> tuple[Path, Path]:
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(SEED)

    x = (x_train.astype(np.float32) / 255.0)[..., np.newaxis]
    model = keras_model(None)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x, y_train, epochs=EPOCHS, batch_size=BATCH, shuffle=True, verbose=0)

    # Convert a batch-1 copy so the files have a fixed input shape [1, 8, 8, 1].
    fixed = keras_model(1)
    fixed.set_weights(model.get_weights())

    f32_path = HERE / "digits_f32.tflite"
    f32_path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(fixed).convert())

    def representative() -> Any:
        for i in range(len(x)):
            yield [x[i : i + 1]]

    converter = tf.lite.TFLiteConverter.from_keras_model(fixed)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    int8_path = HERE / "digits_int8.tflite"
    int8_path.write_bytes(converter.convert())
    return f32_path, int8_path


# --- PyTorch / ONNX -------------------------------------------------------------------


def build_onnx(x_train: np.ndarray, y_train: np.ndarray) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(256, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    x = torch.from_numpy(x_train.astype(np.float32) / 255.0).unsqueeze(1)  # NCHW
    y = torch.from_numpy(y_train)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    net.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH):
            idx = order[start : start + BATCH]
            optimizer.zero_grad()
            loss_fn(net(x[idx]), y[idx]).backward()
            optimizer.step()

    model = nn.Sequential(net, nn.Softmax(dim=1)).eval()
    path = HERE / "digits.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 8, 8),),
        str(path),
        dynamo=False,  # the TorchScript exporter writes one file, weights included
        input_names=["image"],
        output_names=["probabilities"],
        opset_version=17,
    )
    return path


# --- manifests and samples ------------------------------------------------------------


def write_manifest(
    path: Path,
    fmt: str,
    name: str,
    layout: str,
    description: str,
    x_test: np.ndarray,
    y_test: np.ndarray,
) -> dict[str, Any]:
    manifest: dict[str, Any] = {"name": name, **buildlib.describe(path, fmt)}
    preprocessing = {
        "mode": "L",
        "size": [8, 8],
        "layout": layout,
        "pixels": False,
        "mean": 0.0,
        "std": 255.0,
    }
    batch = buildlib.preprocess(x_test, preprocessing, manifest["inputs"][0])
    correct = int((buildlib.predict(path, fmt, batch) == y_test).sum())
    manifest.update(
        preprocessing=preprocessing,
        labels=LABELS,
        accuracy={"dataset": DATASET, "samples": len(y_test), "top1": correct / len(y_test)},
        test_set="digits_test.npz",
        description=description,
    )
    buildlib.write_manifest(path, manifest)
    return manifest


def write_samples(x_test: np.ndarray, y_test: np.ndarray) -> list[Path]:
    from PIL import Image

    out = HERE / "samples"
    out.mkdir(exist_ok=True)
    for old in out.glob("digit_*.png"):
        old.unlink()
    paths = []
    for digit in SAMPLES:
        index = int(np.flatnonzero(y_test == digit)[0])
        path = out / f"digit_{digit}_{index}.png"
        Image.fromarray(x_test[index]).save(path)
        paths.append(path)
    return paths


def main() -> None:
    started = time.monotonic()
    seed_everything()
    x_train, y_train, x_test, y_test = load_data()
    buildlib.write_npz(HERE / "digits_test.npz", images=x_test, labels=y_test)
    write_samples(x_test, y_test)

    f32_path, int8_path = build_tflite(x_train, y_train)
    onnx_path = build_onnx(x_train, y_train)

    common = (
        "Handwritten digit classifier (0-9) for 8x8 grayscale images, trained on "
        "scikit-learn's load_digits (1437 training images; the 360 held out are in "
        "digits_test.npz). Built by models/digits/build.py."
    )
    manifests = [
        write_manifest(
            f32_path,
            "tflite",
            "digits-f32",
            "NHWC",
            f"{common} Keras CNN, float32 input pixel/255, softmax output.",
            x_test,
            y_test,
        ),
        write_manifest(
            int8_path,
            "tflite",
            "digits-int8",
            "NHWC",
            f"{common} The Keras CNN of digits-f32, full-integer quantized: int8 input "
            "(q = pixel - 128), int8 softmax output.",
            x_test,
            y_test,
        ),
        write_manifest(
            onnx_path,
            "onnx",
            "digits-onnx",
            "NCHW",
            f"{common} The same CNN trained in PyTorch, exported to ONNX; NCHW float32 "
            "input pixel/255, softmax output.",
            x_test,
            y_test,
        ),
    ]
    for m in manifests:
        print(
            f"{m['file']:20} {m['size']:>8} B  top1 {m['accuracy']['top1']:.4f}  "
            f"sha256 {m['sha256'][:16]}"
        )
    print(f"built in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
