"""A model file read as a graph of operators over tensors, and cut into segment files.

`_Graph` is what the rest of splitting sees; `_Tflite` reads the TFLite flatbuffer and
`_Onnx` the ONNX protobuf, and each builds the model file of a run of its operators.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mqinfer.node.runtimes.base import concrete_shape
from mqinfer.protocol.manifest import Format, format_of
from mqinfer.split.errors import SplitError, install_hint

SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx"}


class _Graph(ABC):
    """Operators in execution order over integer tensor keys. Constant tensors (weights) are
    left out of `reads`; they are counted in `weights`."""

    format: Format
    n: int
    inputs: list[int]  # model inputs, in the model's order
    outputs: list[int]  # model outputs, in the model's order
    reads: list[list[int]]  # per operator: non-constant tensors it reads
    writes: list[list[int]]  # per operator: tensors it makes
    weights: list[list[tuple[int, int]]]  # per operator: (constant key, bytes)
    names: dict[int, str]
    nbytes: dict[int, int | None]  # None: a tensor that cannot be sent between segments
    size: int  # bytes of the model file

    @abstractmethod
    def op_name(self, i: int) -> str: ...

    @abstractmethod
    def build(self, start: int, end: int, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        """A model file holding operators [start, end) with these inputs and outputs."""

    def describe(self, keys: Sequence[int]) -> str:
        return ", ".join(f"'{self.names[t]}'" for t in keys)


_TFLITE_ITEMSIZE = {
    0: 4,  # FLOAT32
    1: 2,  # FLOAT16
    2: 4,  # INT32
    3: 1,  # UINT8
    4: 8,  # INT64
    6: 1,  # BOOL
    7: 2,  # INT16
    8: 8,  # COMPLEX64
    9: 1,  # INT8
    10: 8,  # FLOAT64
    11: 16,  # COMPLEX128
    12: 8,  # UINT64
    15: 4,  # UINT32
    16: 2,  # UINT16
}


# TFLite metadata entries that describe the whole model's inputs and outputs (names,
# normalisation, labels): a segment has other inputs and outputs, so no segment keeps them.
_WHOLE_MODEL_METADATA = frozenset({"TFLITE_METADATA"})


class _Tflite(_Graph):
    format: Format = "tflite"

    def __init__(self, path: Path) -> None:
        try:
            from ai_edge_litert.tools import flatbuffer_utils
        except ImportError as exc:
            raise SplitError(f"{install_hint('tflite')} ({exc})") from None
        try:
            model = flatbuffer_utils.read_model(str(path))
        except Exception as exc:
            raise SplitError(f"{path.name} is not a readable .tflite model: {exc}") from exc
        self._model: Any = model
        if len(model.subgraphs) != 1:
            raise SplitError(
                f"{path.name} has {len(model.subgraphs)} subgraphs (control flow such as "
                "WHILE or IF): only single-subgraph models can be split"
            )
        if model.externalBuffers:
            raise SplitError(
                f"{path.name} keeps weights in external buffers: only self-contained "
                ".tflite files can be split"
            )
        sg = model.subgraphs[0]
        self._sg: Any = sg
        buffers = model.buffers
        self._const = [
            t.buffer > 0 and buffers[t.buffer].data is not None and len(buffers[t.buffer].data) > 0
            for t in sg.tensors
        ]
        for t in sg.tensors:
            if t.isVariable:
                raise SplitError(
                    f"{path.name} has a variable tensor '{_text(t.name)}' (state kept between "
                    "runs): stateful models cannot be split"
                )
        self.n = len(sg.operators)
        self.inputs = [int(t) for t in sg.inputs]
        self.outputs = [int(t) for t in sg.outputs]
        self.reads, self.writes, self.weights = [], [], []
        for op in sg.operators:
            ins = [int(t) for t in op.inputs if t >= 0]
            self.reads.append([t for t in ins if not self._const[t]])
            self.writes.append([int(t) for t in op.outputs if t >= 0])
            self.weights.append(
                [
                    (int(sg.tensors[t].buffer), len(buffers[sg.tensors[t].buffer].data))
                    for t in dict.fromkeys(ins)
                    if self._const[t]
                ]
            )
        self.names = {i: _text(t.name) for i, t in enumerate(sg.tensors)}
        self.nbytes = {}
        for i, t in enumerate(sg.tensors):
            itemsize = _TFLITE_ITEMSIZE.get(int(t.type))
            shape = [] if t.shape is None else [int(d) for d in t.shape]
            self.nbytes[i] = None if itemsize is None else itemsize * _count(shape)
        self.size = path.stat().st_size
        # Every segment keeps the same metadata: the entries about the runtime the model
        # needs (min_runtime_version, reduced_precision_support, ...), with their buffers
        # re-indexed. Left out of every segment: entries that describe the whole model's
        # inputs and outputs (TFLITE_METADATA, wrong for a segment) and entries pointing
        # past the end of the buffers.
        self._metadata: list[Any] = [
            entry
            for entry in model.metadata or []
            if 0 < int(entry.buffer) < len(buffers)
            and _text(entry.name) not in _WHOLE_MODEL_METADATA
        ]

    def op_name(self, i: int) -> str:
        from ai_edge_litert.tools import flatbuffer_utils

        name = flatbuffer_utils.opcode_to_name(self._model, self._sg.operators[i].opcodeIndex)
        return str(name or "custom")

    def build(self, start: int, end: int, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils

        model, sg = self._model, self._sg
        ops = sg.operators[start:end]
        used: set[int] = set(inputs) | set(outputs)
        for op in ops:
            used.update(int(t) for t in op.inputs if t >= 0)
            used.update(int(t) for t in op.outputs if t >= 0)
            if op.intermediates is not None:
                used.update(int(t) for t in op.intermediates if t >= 0)
        # buffer 0 stays the empty sentinel every non-constant tensor points at
        buffers: list[Any] = [schema.BufferT()]
        buffer_map: dict[int, int] = {}

        def keep_buffer(old: int) -> int:
            if old not in buffer_map:
                buffer_map[old] = len(buffers)
                buffers.append(model.buffers[old])
            return buffer_map[old]

        tensor_map: dict[int, int] = {}
        tensors: list[Any] = []
        for t in sorted(used):
            tensor = copy.copy(sg.tensors[t])
            tensor.buffer = keep_buffer(tensor.buffer) if self._const[t] else 0
            tensor_map[t] = len(tensors)
            tensors.append(tensor)

        def remap(keys: Any) -> list[int] | None:
            if keys is None:
                return None
            return [tensor_map[int(t)] if t >= 0 else -1 for t in keys]

        new_ops = []
        for op in ops:
            new_op = copy.copy(op)
            new_op.inputs = remap(op.inputs)
            new_op.outputs = remap(op.outputs)
            new_op.intermediates = remap(op.intermediates)
            new_ops.append(new_op)
        new_sg = copy.copy(sg)
        new_sg.tensors = tensors
        new_sg.operators = new_ops
        new_sg.inputs = [tensor_map[t] for t in inputs]
        new_sg.outputs = [tensor_map[t] for t in outputs]
        new_model = copy.copy(model)
        new_model.subgraphs = [new_sg]
        new_model.signatureDefs = None  # they name tensors by their old indices
        metadata = [_kept_metadata(e, keep_buffer(int(e.buffer))) for e in self._metadata]
        new_model.metadata = metadata or None
        # the deprecated list of metadata buffers: those of the entries kept (converters
        # often leave stale indices here, past the end of the buffers)
        new_model.metadataBuffer = (
            [int(entry.buffer) for entry in metadata] or None
            if model.metadataBuffer is not None
            else None
        )
        new_model.buffers = buffers
        return bytes(flatbuffer_utils.convert_object_to_bytearray(new_model))


class _Onnx(_Graph):
    format: Format = "onnx"

    def __init__(self, path: Path) -> None:
        try:
            import onnx
            import onnx.shape_inference
            import onnx.utils
        except ImportError as exc:
            raise SplitError(f"{install_hint('onnx')} ({exc})") from None
        try:
            loaded = onnx.load(str(path))
            model = onnx.shape_inference.infer_shapes(loaded)
        except Exception as exc:
            raise SplitError(f"{path.name} is not a readable .onnx model: {exc}") from exc
        graph = model.graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    raise SplitError(
                        f"{path.name} has control flow (a {node.op_type} node with a "
                        "subgraph): only models without subgraphs can be split"
                    )
        initializers = {i.name: i for i in graph.initializer}
        _complete_shapes(path, model, initializers)
        self._model = model
        self._extractor = onnx.utils.Extractor(model)
        self._nodes = list(graph.node)
        keys: dict[str, int] = {}

        def key(name: str) -> int:
            return keys.setdefault(name, len(keys))

        # constants: initializers, and what nodes make from constants alone (Constant, or
        # a shape computed from weights); a segment that needs one recomputes it
        constant = set(initializers)
        for node in graph.node:
            if all(name in constant for name in node.input if name):
                constant.update(name for name in node.output if name)
        self.n = len(graph.node)
        self.inputs = [key(i.name) for i in graph.input if i.name not in initializers]
        self.outputs = [key(o.name) for o in graph.output]
        self.reads, self.writes, self.weights = [], [], []
        for node in graph.node:
            names = list(dict.fromkeys(name for name in node.input if name))
            self.reads.append([key(name) for name in names if name not in constant])
            self.writes.append([key(name) for name in node.output if name])
            self.weights.append(
                [
                    (key(name), _initializer_bytes(initializers[name]))
                    for name in names
                    if name in initializers
                ]
            )
        self.names = {k: name for name, k in keys.items()}
        infos = {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}
        self.nbytes = {k: _value_bytes(infos.get(name)) for name, k in keys.items()}
        self.size = path.stat().st_size
        self._constant = constant
        self._position = {
            name: i for i, node in enumerate(graph.node) for name in node.output if name
        }

    def op_name(self, i: int) -> str:
        return str(self._nodes[i].op_type)

    def build(self, start: int, end: int, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        segment = self._extractor.extract_model(
            [self.names[t] for t in inputs], [self.names[t] for t in outputs]
        )
        # besides its own nodes, a segment may only recompute constants made earlier
        stray = [
            node.name or node.op_type
            for node in segment.graph.node
            if not start <= self._position.get(_first(node.output), -1) < end
            and not all(name in self._constant for name in node.output if name)
        ]
        if stray:
            raise SplitError(
                f"ONNX segment [{start}, {end}) would also need node {stray[0]!r} from outside "
                "it: the model's nodes are not in topological order"
            )
        return bytes(segment.SerializeToString())


def _kept_metadata(entry: Any, buffer: int) -> Any:
    kept = copy.copy(entry)
    kept.buffer = buffer
    return kept


def _complete_shapes(path: Path, model: Any, initializers: dict[str, Any]) -> None:
    """Give every tensor that nodes make a type with a known rank.

    ONNX shape inference leaves some tensors without a shape (a Concat of tensors of
    dynamic rank, for example); a segment whose input or output had no rank could not be
    fed. Such tensors are made outputs of a copy of the model, which is run once with
    ONNX Runtime on zeros (dynamic dimensions as 1), and their value info is completed
    with the rank seen and every dimension left dynamic."""
    import onnx
    import onnx.helper

    graph = model.graph
    infos = {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}
    missing = [
        name
        for node in graph.node
        for name in node.output
        if name
        and name not in initializers
        and (
            name not in infos
            or not infos[name].type.HasField("tensor_type")
            or not infos[name].type.tensor_type.HasField("shape")
        )
    ]
    if not missing:
        return
    probe = copy.deepcopy(model)
    graph_outputs = {o.name for o in probe.graph.output}
    for name in missing:
        if name not in graph_outputs:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(
            probe.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        feed: dict[str, np.ndarray] = {
            arg.name: np.zeros(
                [d if isinstance(d, int) and d >= 0 else 1 for d in arg.shape],
                _ORT_DTYPES.get(arg.type, np.float32),
            )
            for arg in session.get_inputs()
        }
        values = session.run(missing, feed)
    except Exception as exc:
        raise SplitError(
            f"{path.name}: tensor '{missing[0]}' has no shape in the model, and running the "
            f"model to find it failed: {_one_line(exc)}"
        ) from None
    for name, value in zip(missing, values, strict=True):
        array = np.asarray(value)
        info = infos.get(name)
        if info is None or not info.type.HasField("tensor_type"):
            info = onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), None
            )
            graph.value_info.append(info)
        shape = info.type.tensor_type.shape
        shape.Clear()
        for _ in range(array.ndim):
            shape.dim.add()


_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _first(names: Sequence[str]) -> str:
    return next((name for name in names if name), "")


def _text(name: Any) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name or "")


def _count(shape: Sequence[int]) -> int:
    return int(np.prod(concrete_shape(shape), dtype=np.int64))


def _initializer_bytes(tensor: Any) -> int:
    import onnx.helper

    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:
        itemsize = 4
    return itemsize * _count([int(d) for d in tensor.dims])


def _value_bytes(info: Any) -> int | None:
    """Bytes of a tensor from its ONNX type (dynamic dimensions as 1); None without a type."""
    import onnx.helper

    if info is None or not info.type.HasField("tensor_type"):
        return None
    tensor_type = info.type.tensor_type
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).itemsize
    except Exception:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    return itemsize * _count(dims)


def _read_graph(path: Path) -> _Graph:
    fmt = _format(path)
    return _Tflite(path) if fmt == "tflite" else _Onnx(path)


def _format(path: Path) -> str:
    try:
        fmt = format_of(path.name)
    except ValueError as exc:
        raise SplitError(str(exc)) from None
    if fmt == "edgetpu_tflite":
        raise SplitError(
            f"{path.name} is compiled for the Edge TPU: its graph sits inside one "
            "edgetpu-custom-op and cannot be cut. Split the CPU .tflite model instead and "
            "compile each segment with edgetpu_compiler"
        )
    return fmt
