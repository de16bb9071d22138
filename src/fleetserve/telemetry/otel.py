"""Optional OpenTelemetry export of finished request traces.

Each finished :class:`~fleetserve.telemetry.tracing.Trace` becomes one OpenTelemetry trace: a root span named
``request`` (attributes ``fleetserve.request_id``, ``fleetserve.model`` and ``fleetserve.attempts``, the number
of dispatch attempts) from the request's arrival to the end of its last span, and one child span per fleetserve
span (receive, queue, dispatch, prefill, decode, finish, ...) carrying that span's attributes under the
``fleetserve.`` prefix. Start and end times are given explicitly as wall-clock nanoseconds (the trace's arrival
time plus each span's offset), so the exported timeline is the trace's own, not the time of export.

To enable it, install the ``otel`` extra (``pip install 'fleetserve[otel]'``) and start the gateway with
``--otlp-endpoint URL``, e.g. ``--otlp-endpoint http://collector:4318/v1/traces``; spans are sent with OTLP over
HTTP in batches. Without the option nothing is exported and OpenTelemetry is never imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fleetserve.telemetry.tracing import Trace

_INSTALL_HINT = "pip install 'fleetserve[otel]'"
ATTRIBUTE_PREFIX = "fleetserve."


def _attribute_value(value: Any) -> Any:
    """``value`` as an OpenTelemetry attribute value (str, bool, int, float or a homogeneous sequence of one of
    them); None when it should be left out."""
    if value is None:
        return None
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        items = list(value)
        for kind in (bool, str):
            if items and all(isinstance(item, kind) for item in items):
                return tuple(items)
        if items and all(isinstance(item, int) and not isinstance(item, bool) for item in items):
            return tuple(items)
        if items and all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in items):
            return tuple(float(item) for item in items)
    return str(value)


def _attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in attributes.items():
        converted = _attribute_value(value)
        if converted is not None:
            out[ATTRIBUTE_PREFIX + str(key)] = converted
    return out


class OtelExporter:
    """Sends finished traces to an OpenTelemetry span exporter.

    ``endpoint``: an OTLP/HTTP traces URL (e.g. ``http://collector:4318/v1/traces``), used behind a batching
    processor. ``span_exporter``: any OpenTelemetry ``SpanExporter`` (tests pass an ``InMemorySpanExporter``),
    used behind a simple, synchronous processor; it takes precedence over ``endpoint``. The exporter has its own
    tracer provider; the process-wide one is left alone.
    """

    def __init__(self, endpoint: str | None = None, span_exporter=None, service_name: str = "fleetserve-gateway"):
        try:
            from opentelemetry import trace as otel_trace
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        except ImportError as e:
            raise ImportError(
                f"OpenTelemetry export needs the opentelemetry-sdk package; install it with {_INSTALL_HINT}"
            ) from e

        if span_exporter is not None:
            processor = SimpleSpanProcessor(span_exporter)
        else:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError as e:
                raise ImportError(
                    "OTLP export needs the opentelemetry-exporter-otlp-proto-http package; install it with "
                    f"{_INSTALL_HINT}"
                ) from e
            processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter())

        self._otel_trace = otel_trace
        self.provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("fleetserve")

    def export(self, trace: Trace) -> None:
        """Export ``trace``: a ``request`` root span and one child span per fleetserve span."""
        base_ns = round(trace.created * 1e9)

        def wall_ns(offset: float) -> int:
            return base_ns + round(offset * 1e9)

        end = max((max(span.start, span.end) for span in trace.spans), default=0.0)
        root = self.tracer.start_span(
            "request",
            attributes={
                ATTRIBUTE_PREFIX + "request_id": trace.request_id,
                ATTRIBUTE_PREFIX + "model": trace.model,
                ATTRIBUTE_PREFIX + "attempts": len(trace.attempts),
            },
            start_time=base_ns,
        )
        context = self._otel_trace.set_span_in_context(root)
        for span in sorted(trace.spans, key=lambda s: (s.start, s.end)):
            child = self.tracer.start_span(
                span.name,
                context=context,
                attributes=_attributes(span.attributes),
                start_time=wall_ns(span.start),
            )
            child.end(end_time=wall_ns(span.end))
        root.end(end_time=wall_ns(end))

    def shutdown(self) -> None:
        """Flush pending spans and shut the provider down."""
        self.provider.force_flush()
        self.provider.shutdown()
