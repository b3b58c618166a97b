"""`mqinfer split`: cut a model into segments that run one after another.

A model is a list of operators in execution order (TFLite) or nodes in topological order
(ONNX). A *cut* at position c sends operators [0, c) to one segment and [c, n) to the
next; the tensors made before c and still needed from c on (or model outputs) cross the
cut and become the outputs of the one segment and the inputs of the next, matched by name.

How the cuts are chosen:

1. Candidate cuts are the positions where at most `max_crossing` tensors cross. With one,
   a cut where a model input is still needed later, or a model output is already made,
   is refused: a segment would have to pass that tensor through without using it. With
   more (None, the default, `--max-crossing auto`: up to `AUTO_MAX_CROSSING`), such
   tensors cross like the others and are passed through; at most `MEASURED_SEVERAL` cuts
   where several tensors cross are measured, spread over the model, and a plan of cuts
   where one tensor crosses is kept whenever it balances within `BALANCE_SLACK` of the
   best.
2. The cost of a segment is its run time plus the transfer of the tensors it sends on.
   Run time is measured, not guessed: the prefix [0, c) of the model is built for every
   candidate c and timed with the real runtime, so segment [a, b) takes about L(b) - L(a).
   (Weights are back-loaded in CNNs and run time is front-loaded, so neither the operator
   count nor the weights are a guide.)
3. The cuts minimising the largest segment cost are chosen (dynamic programming over the
   candidates; among plans within `BALANCE_SLACK` of the best, the least total cost wins),
   under the optional cap on each segment's file size.
4. The segments are built, timed one by one, and verified: chained on seeded random inputs
   and on the given samples, their outputs must equal the whole model's (TFLite bitwise;
   ONNX bitwise or within `ONNX_TOLERANCE` of the largest output value).

Only then are the files written: ``{stem}.seg{k}{suffix}`` and ``{stem}.pipeline.json``
(`protocol.manifest.Pipeline`).

The modules, each built on the ones before: `errors` (`SplitError`), `graph` (a .tflite
or .onnx file as operators over tensors, and the files of its segments), `cuts` (where
the model may be cut), `measure` (running and timing models), `plan` (choosing the cuts
by cost), `verification` (whole model against chained segments), `splitter`
(`split_model`) and `cli` (`mqinfer split`). Names with a leading underscore are shared
between these modules only; what is public is exported here.
"""

from mqinfer.split.cli import (
    DESCRIPTION,
    add_parser,
    main,
    read_sample,
    report,
    run,
)
from mqinfer.split.cuts import AUTO_MAX_CROSSING
from mqinfer.split.errors import SplitError
from mqinfer.split.graph import SUFFIXES
from mqinfer.split.measure import (
    MAX_REPS,
    MIN_REPS,
    MIN_TIMING_S,
    WARMUP_RUNS,
    median_ms,
    paired_ratio,
    random_inputs,
)
from mqinfer.split.plan import (
    BALANCE_SLACK,
    MB,
    TRANSFER_MS_PER_BYTE,
    TRANSFER_MS_PER_MESSAGE,
)
from mqinfer.split.splitter import (
    MEASURED_SEVERAL,
    pipeline_file,
    split_model,
    split_temporarily,
)
from mqinfer.split.verification import ONNX_TOLERANCE, RANDOM_INPUTS, SEED, verify, verify_files

__all__ = [
    "AUTO_MAX_CROSSING",
    "BALANCE_SLACK",
    "DESCRIPTION",
    "MAX_REPS",
    "MB",
    "MEASURED_SEVERAL",
    "MIN_REPS",
    "MIN_TIMING_S",
    "ONNX_TOLERANCE",
    "RANDOM_INPUTS",
    "SEED",
    "SUFFIXES",
    "TRANSFER_MS_PER_BYTE",
    "TRANSFER_MS_PER_MESSAGE",
    "WARMUP_RUNS",
    "SplitError",
    "add_parser",
    "main",
    "median_ms",
    "paired_ratio",
    "pipeline_file",
    "random_inputs",
    "read_sample",
    "report",
    "run",
    "split_model",
    "split_temporarily",
    "verify",
    "verify_files",
]
