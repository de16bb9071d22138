"""OpenTelemetry export of request traces: span tree, names, attributes and a timeline equal to the trace's."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from fleetserve.telemetry.otel import OtelExporter  # noqa: E402
from fleetserve.telemetry.tracing import Attempt, Trace  # noqa: E402

CREATED = 1_700_000_123.456789


def make_trace() -> Trace:
    trace = Trace("req-42", "tiny-llama", created=CREATED)
    trace.add_span("receive", 0.0, 0.0012, bytes=512)
    trace.add_span("queue", 0.0012, 0.0503, position=3)
    trace.attempts.append(Attempt("w1", "10.0.0.1:50051", 0.0503, ended=0.8105, outcome="finished", tokens=17))
    trace.add_span("dispatch", 0.0503, 0.8105, worker="w1", outcome="finished", tokens=17, ratio=0.25)
    trace.add_span("finish", 0.8123, 0.8123, reason="stop", cached=False, extra=None, shape=(2, 3))
    return trace


@pytest.fixture
def exported():
    memory = InMemorySpanExporter()
    exporter = OtelExporter(span_exporter=memory, service_name="test-gateway")
    trace = make_trace()
    exporter.export(trace)
    spans = memory.get_finished_spans()
    exporter.shutdown()
    return trace, spans


def split(spans):
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1
    return roots[0], [s for s in spans if s.parent is not None]


def test_one_root_and_one_child_per_span(exported):
    trace, spans = exported
    root, children = split(spans)
    assert root.name == "request"
    assert len(children) == len(trace.spans)
    assert [c.name for c in children] == ["receive", "queue", "dispatch", "finish"]
    for child in children:
        assert child.parent.span_id == root.context.span_id
        assert child.context.trace_id == root.context.trace_id
    assert root.resource.attributes["service.name"] == "test-gateway"


def test_root_attributes_and_extent(exported):
    trace, spans = exported
    root, _ = split(spans)
    assert root.attributes["fleetserve.request_id"] == "req-42"
    assert root.attributes["fleetserve.model"] == "tiny-llama"
    assert root.attributes["fleetserve.attempts"] == 1
    assert abs(root.start_time / 1e9 - CREATED) < 1e-6
    assert abs((root.end_time - root.start_time) / 1e9 - 0.8123) < 1e-6


def test_child_attributes_prefixed_and_converted(exported):
    _, spans = exported
    _, children = split(spans)
    by_name = {c.name: c for c in children}
    assert dict(by_name["receive"].attributes) == {"fleetserve.bytes": 512}
    assert dict(by_name["queue"].attributes) == {"fleetserve.position": 3}
    assert dict(by_name["dispatch"].attributes) == {
        "fleetserve.worker": "w1",
        "fleetserve.outcome": "finished",
        "fleetserve.tokens": 17,
        "fleetserve.ratio": 0.25,
    }
    finish = dict(by_name["finish"].attributes)
    assert finish["fleetserve.reason"] == "stop"
    assert finish["fleetserve.cached"] is False
    assert "fleetserve.extra" not in finish
    assert tuple(finish["fleetserve.shape"]) == (2, 3)


def test_timeline_equals_trace(exported):
    trace, spans = exported
    root, children = split(spans)
    by_name = {c.name: c for c in children}
    for span in trace.spans:
        child = by_name[span.name]
        assert abs((child.end_time - child.start_time) / 1e9 - span.duration) < 1e-6
        assert abs((child.start_time - root.start_time) / 1e9 - span.start) < 1e-6
        assert child.start_time >= root.start_time
        assert child.end_time <= root.end_time
    starts = [c.start_time for c in children]
    assert starts == sorted(starts)
    assert by_name["finish"].start_time == by_name["finish"].end_time


def test_empty_trace_exports_a_point_root():
    memory = InMemorySpanExporter()
    exporter = OtelExporter(span_exporter=memory)
    exporter.export(Trace("req-empty", "m", created=CREATED))
    exporter.shutdown()
    (root,) = memory.get_finished_spans()
    assert root.name == "request"
    assert root.start_time == root.end_time
    assert root.resource.attributes["service.name"] == "fleetserve-gateway"


def test_missing_packages_raise_a_clear_import_error(monkeypatch):
    for name in list(sys.modules):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ImportError, match=r"pip install 'fleetserve\[otel\]'"):
        OtelExporter(span_exporter=object())
    with pytest.raises(ImportError, match=r"pip install 'fleetserve\[otel\]'"):
        OtelExporter(endpoint="http://collector:4318/v1/traces")


def test_only_top_level_package_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ImportError, match=r"fleetserve\[otel\]"):
        OtelExporter(span_exporter=InMemorySpanExporter())


def test_otlp_http_exporter_is_built_for_an_endpoint():
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    exporter = OtelExporter(endpoint="http://127.0.0.1:9/v1/traces")
    try:
        processors = exporter.provider._active_span_processor._span_processors
        assert type(processors[0]).__name__ == "BatchSpanProcessor"
    finally:
        exporter.provider.shutdown()


def test_the_trace_store_exports_each_finished_trace_once():
    from fleetserve.telemetry.tracing import TraceStore

    memory = InMemorySpanExporter()
    store = TraceStore(exporter=OtelExporter(span_exporter=memory))
    trace = store.start("r-1", "m")
    trace.add_span("receive", 0.0, 0.001)
    trace.close()
    trace.close()
    names = sorted(s.name for s in memory.get_finished_spans())
    assert names == ["receive", "request"]
    assert not TraceStore(capacity=0, exporter=OtelExporter(span_exporter=memory)).start("r-2", "m").on_close
