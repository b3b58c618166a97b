"""The one error of splitting: what was asked cannot be done, and why."""


class SplitError(Exception):
    """The model cannot be split as asked; the message says what was wrong and what was
    expected."""


# What `mqinfer split` needs for each model format, as the package extra that installs it:
# .tflite models are read and run with ai-edge-litert; .onnx models are read with onnx and
# run with onnxruntime.
EXTRAS = {"tflite": "litert", "onnx": "split"}
NEEDS = {"tflite": "ai-edge-litert", "onnx": "onnx and onnxruntime"}


def install_hint(fmt: str) -> str:
    """How to install what splitting a model of this format needs."""
    extra = EXTRAS.get(fmt, "split")
    return (
        f"splitting .{fmt} models needs {NEEDS.get(fmt, 'a runtime')}: "
        f"pip install 'mqinfer[{extra}]'"
    )
