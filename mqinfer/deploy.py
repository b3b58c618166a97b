"""`mqinfer deploy` and `mqinfer undeploy`: desired state in, status out.

Deploying uploads the model artifact (unless the broker has it), publishes the retained
service spec (signed with --sign-key), and with --wait follows the retained status until
the coordinator reports the service ready or failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mqinfer import options
from mqinfer.coordinator import status
from mqinfer.keys import KeyFileError, load_private_key
from mqinfer.link import Link, check
from mqinfer.mqtt import Brokers, Connection, Message, MQTTError
from mqinfer.protocol import codec, signing
from mqinfer.protocol import messages as m
from mqinfer.protocol.errors import ProtocolError
from mqinfer.protocol.statuses import Statuses
from mqinfer.protocol.topics import Topics
from mqinfer.servicefile import (
    ModelFile,
    PipelineFiles,
    ServiceFile,
    SpecFileError,
    is_pipeline,
    read_model,
    read_pipeline,
    read_spec_file,
    service_spec,
    whole_model,
)
from mqinfer.split import SplitError, pipeline_file, split_model
from mqinfer.upload import Uploader, progress_bar

EXIT_FAILED = 1  # the service failed (reason printed)
EXIT_TIMEOUT = 4  # --wait ran out of time


class _Follower:
    """Collects the statuses of one service (and artifact metas for the uploader)."""

    def __init__(self, topics: Topics, name: str) -> None:
        self.topics = topics
        self.name = name
        self.kept = Statuses()  # [T-STATUS-2] only the current coordinator's count
        self.cleared = False
        self.changed = threading.Condition()
        self.uploader: Uploader | None = None

    @property
    def status(self) -> m.ServiceStatus | None:
        return self.kept.status

    def filters(self) -> list[tuple[str, int]]:
        return [(self.topics.service_status(self.name), 1), (self.topics.coordinator_state(), 1)]

    def on_message(self, message: Message) -> None:
        if self.uploader is not None:
            self.uploader.on_message(message)
        if message.topic == self.topics.coordinator_state():
            with self.changed:
                try:
                    state = codec.decode_as(m.CoordinatorState, message.payload)
                except ProtocolError:
                    return
                self.kept.current = state.session
                self.changed.notify_all()
            return
        if message.topic != self.topics.service_status(self.name):
            return
        with self.changed:
            if not message.payload:
                self.kept.take(None)
                self.cleared = True
            else:
                try:
                    msg = codec.decode_as(m.ServiceStatus, message.payload)
                except ProtocolError:
                    return
                self.kept.take(msg)
                self.cleared = False
            self.changed.notify_all()

    def until(self, outcome: Callable[[], int | None], wait: float) -> int | None:
        """Wait until `outcome()` (called with the status current) is not None; None when
        `wait` seconds pass first."""
        deadline = time.monotonic() + wait
        with self.changed:
            while (result := outcome()) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(min(left, 0.5))
            return result


def _until(
    link: Link, follower: _Follower, outcome: Callable[[], int | None], wait: float
) -> int | None:
    """`follower.until`, on a new connection whenever the connection is lost meanwhile."""
    deadline = time.monotonic() + wait

    def watch(conn: Connection) -> int | None:
        def seen() -> int | None:
            check(conn)
            return outcome()

        return follower.until(seen, deadline - time.monotonic())

    return link.run(watch)


def deploy(
    url: Brokers,
    topics: Topics,
    spec_file: ServiceFile,
    model: ModelFile,
    wait: float | None,
    protocol: str = "auto",
    reupload: bool = False,
    pipeline: PipelineFiles | None = None,
    sign_key: Ed25519PrivateKey | None = None,
) -> int:
    """Upload the model (or, for a pipeline, each segment) and publish the spec, signed
    with `sign_key` if given (one signature covers every segment's sha256)."""
    revision = uuid.uuid4().hex[:12]
    spec = service_spec(spec_file, model, revision, pipeline.pipeline if pipeline else None)
    if sign_key is not None:
        spec = signing.signed(spec, sign_key)
    follower = _Follower(topics, spec.name)
    link = Link(url, protocol, follower.on_message, "deploy")
    try:
        uploader = follower.uploader = Uploader(topics)
        for artifact in pipeline.segments if pipeline else [model]:
            sent = link.run(
                lambda conn, artifact=artifact: uploader.upload(  # type: ignore[misc]
                    conn,
                    artifact.sha256,
                    artifact.data,
                    artifact.path.name,
                    artifact.format,
                    artifact.manifest,
                    progress_bar(f"uploading {artifact.path.name}"),
                    force=reupload,
                )
            )
            print(
                f"artifact {artifact.sha256[:12]} ({artifact.path.name}, "
                f"{len(artifact.data)} bytes): "
                + ("uploaded" if sent else "already on the broker"),
                file=sys.stderr,
            )
        link.follow(follower.filters())
        link.run(
            lambda conn: conn.publish_wait(
                topics.service_spec(spec.name), codec.encode(spec), retain=True
            )
        )
        signed_by = f", signed by key {spec.signature.key}" if spec.signature else ""
        print(
            f"service {spec.name}: spec published (revision {revision}{signed_by})",
            file=sys.stderr,
        )
        if wait is None:
            return 0

        def outcome() -> int | None:
            st = follower.status
            if st is None or st.revision != revision:
                return None
            if st.state == "ready":
                print(f"service {spec.name}: {status.service_line(st)}")
                return 0
            if st.state in ("failed", "degraded") and not any(
                r.state == "deploying" for r in st.replicas
            ):
                print(f"service {spec.name}: {st.state}: {st.reason}", file=sys.stderr)
                return EXIT_FAILED if st.state == "failed" else 0
            return None

        result = _until(link, follower, outcome, wait)
        if result is None:
            st = follower.status
            now = status.service_line(st) if st else "no status yet"
            print(
                f"service {spec.name}: not ready after {wait:.0f} s: {now}; "
                "is a coordinator running?",
                file=sys.stderr,
            )
            return EXIT_TIMEOUT
        return result
    finally:
        link.close()


def undeploy(
    url: Brokers, topics: Topics, name: str, wait: float | None, protocol: str = "auto"
) -> int:
    follower = _Follower(topics, name)
    link = Link(url, protocol, follower.on_message, "undeploy")
    try:
        link.follow(follower.filters())
        link.run(lambda conn: conn.publish_wait(topics.service_spec(name), b"", retain=True))
        print(f"service {name}: spec removed", file=sys.stderr)
        if wait is None:
            return 0

        def removed() -> int | None:
            st = follower.status
            return 0 if follower.cleared or (st is not None and st.state == "removed") else None

        if _until(link, follower, removed, wait) is None:
            st = follower.status
            print(
                f"service {name}: still {st.state if st else 'unknown'} after "
                f"{wait:.0f} s; is a coordinator running?",
                file=sys.stderr,
            )
            return EXIT_TIMEOUT
        print(f"service {name}: removed")
        return 0
    finally:
        link.close()


# ---- command line -------------------------------------------------------------------------


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "deploy",
        help="deploy a model as a service (uploads the model over MQTT)",
        description="Deploy a service from a spec file (YAML or JSON: name, model, replicas, "
        "constraints, segments) or straight from a model file with --model and --name. The "
        "model travels to the nodes over the broker; a manifest beside the model (same name, "
        ".json) adds preprocessing and labels. The coordinator places the replicas. With "
        "--segments N the model is split here (as `mqinfer split` does, verified) and runs "
        "as a pipeline of N stages, each on its own node where there are enough; a "
        "pipeline manifest (.pipeline.json) as the model deploys segments split before.",
    )
    p.add_argument("spec", nargs="?", type=Path, help="service spec file (.yaml or .json)")
    p.add_argument(
        "--model",
        type=Path,
        help="a .tflite, _edgetpu.tflite or .onnx file, or a .pipeline.json of `mqinfer split`",
    )
    p.add_argument("--name", help="service name (with --model)")
    p.add_argument("--replicas", type=int, help="replicas, per stage (overrides the spec file)")
    p.add_argument(
        "--segments",
        type=int,
        help="split the model into N pipeline stages, 2-8 (overrides the spec file)",
    )
    p.add_argument("--max-segment-mb", type=float, help="with --segments: the largest segment file")
    p.add_argument(
        "--accelerator",
        choices=["cpu", "edgetpu", "gpu", "openvino", "npu"],
        help="only nodes with this accelerator kind",
    )
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only nodes with this label; repeatable",
    )
    p.add_argument(
        "--reupload",
        action="store_true",
        help="upload the model even if the broker already has an artifact with its hash "
        "(repairs a damaged copy that nodes refuse)",
    )
    p.add_argument(
        "--sign-key",
        type=Path,
        default=options.env("SIGN_KEY", "") or None,
        metavar="FILE",
        help="sign the spec with this Ed25519 private key (NAME.key of `mqinfer keys "
        "generate`); nodes started with --trust-key run only signed specs "
        "(env MQINFER_SIGN_KEY)",
    )
    _add_wait(p, "until the service is ready or failed")
    options.add_common(p)
    p.set_defaults(func=_run_deploy, parser=p)

    u = sub.add_parser(
        "undeploy",
        help="remove a service",
        description="Remove a service: the coordinator stops its replicas on every node.",
    )
    u.add_argument("name", help="service name")
    _add_wait(u, "until every replica is stopped")
    options.add_common(u)
    u.set_defaults(func=_run_undeploy, parser=u)


def _add_wait(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--wait", action="store_true", help=f"block {what}")
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds --wait waits (default %(default)s); exit 4 on timeout",
    )


def _run_deploy(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    url, topics = options.resolve(parser, args)
    if (args.spec is None) == (args.model is None):
        parser.error("give a spec file, or --model PATH --name NAME (not both)")
    if args.model is not None and not args.name:
        parser.error("--model needs --name (the service name)")
    if args.replicas is not None and args.replicas < 0:
        parser.error("--replicas: expected 0 or more")
    if args.segments is not None and not 0 <= args.segments <= 8:
        parser.error("--segments: expected 2-8 (0 or 1: the whole model)")
    labels = {}
    for text in args.label:
        key, sep, value = text.partition("=")
        if not sep or not key:
            parser.error(f"--label: expected KEY=VALUE, got {text!r}")
        labels[key] = value
    sign_key = None
    if args.sign_key is not None:
        try:
            sign_key = load_private_key(args.sign_key)
        except KeyFileError as e:
            parser.error(f"--sign-key: {e}")
    try:
        if args.spec is not None:
            spec_file, path = read_spec_file(args.spec)
        else:
            spec_file = ServiceFile(name=args.name, model=str(args.model))
            path = args.model
        update: dict[str, object] = {}
        if args.replicas is not None:
            update["replicas"] = args.replicas
        if args.segments is not None:
            update["segments"] = args.segments
        if args.max_segment_mb is not None:
            update["max_segment_mb"] = args.max_segment_mb
        if args.accelerator or labels:
            update["constraints"] = m.Constraints(
                accelerator=args.accelerator or spec_file.constraints.accelerator,
                labels={**spec_file.constraints.labels, **labels},
            )
        spec_file = spec_file.model_copy(update=update)
        with tempfile.TemporaryDirectory(prefix="mqinfer-split-") as tmp:
            model, pipeline = _model_files(spec_file, path, Path(tmp))
            return deploy(
                url,
                topics,
                spec_file,
                model,
                args.timeout if args.wait else None,
                args.mqtt_version,
                args.reupload,
                pipeline,
                sign_key,
            )
    except (SpecFileError, SplitError, ValueError) as e:
        print(f"mqinfer deploy: {e}", file=sys.stderr)
        return 2
    except MQTTError as e:
        print(f"mqinfer deploy: {e}", file=sys.stderr)
        return 1


def _model_files(
    spec_file: ServiceFile, path: Path, tmp: Path
) -> tuple[ModelFile, PipelineFiles | None]:
    """The whole model, and the pipeline to deploy: split before, or split now into tmp."""
    if is_pipeline(path):
        files = read_pipeline(path)
        if spec_file.segments > 1 and spec_file.segments != len(files.segments):
            raise SpecFileError(
                f"{path.name} has {len(files.segments)} segments, not {spec_file.segments}; "
                "split again, or leave segments out"
            )
        return whole_model(files), files
    model = read_model(path)
    if spec_file.segments <= 1:
        return model, None
    pipeline = split_model(path, spec_file.segments, tmp, max_segment_mb=spec_file.max_segment_mb)
    for seg in pipeline.segments:
        print(
            f"segment {seg.manifest.file}: ops {seg.ops[0]}-{seg.ops[1]}, "
            f"{seg.manifest.size} bytes, {seg.latency_ms or 0:.2f} ms here",
            file=sys.stderr,
        )
    return model, read_pipeline(tmp / pipeline_file(path))


def _run_undeploy(args: argparse.Namespace) -> int:
    url, topics = options.resolve(args.parser, args)
    try:
        topics.service_spec(args.name)
    except ValueError as e:
        args.parser.error(str(e))
    try:
        return undeploy(
            url, topics, args.name, args.timeout if args.wait else None, args.mqtt_version
        )
    except MQTTError as e:
        print(f"mqinfer undeploy: {e}", file=sys.stderr)
        return 1
