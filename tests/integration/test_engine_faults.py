"""Faults stay small: bfloat16 serves steps mixing prefill chunks and decodes; a failed step fails only its requests
(typed error, blocks freed, engine and worker serving on); failing steps in a row make the worker's Health say so
until a step succeeds."""

import asyncio

import grpc
import pytest
import torch

from fleetserve.contract import SamplingParams
from fleetserve.engine.async_engine import AsyncEngine
from fleetserve.errors import EngineStepError
from fleetserve.protocol import convert
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.worker.server import WorkerService, serve_worker

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


class DeviceFault(RuntimeError):
    """What the injected fault raises (a RuntimeError, as torch's own device errors are)."""


def run_all(engine) -> dict[str, list]:
    """Step until nothing is left; every output, by request id."""
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def test_bfloat16_serves_steps_mixing_prefill_chunks_and_decodes(make_engine, chat_prompts, monkeypatch):
    engine = make_engine(dtype="bfloat16", budget=24)  # prompts of ~40 tokens arrive in chunks of 24 at most
    assert {p.dtype for p in engine.runner.model.parameters()} == {torch.bfloat16}
    mixed = []
    execute = engine.runner.execute

    def watch(plan):
        decodes = any(s.num_tokens == 1 for s in plan.seqs)
        chunks_after_a_prefix = any(s.num_tokens > 1 and s.start > 0 for s in plan.seqs)
        mixed.append(decodes and chunks_after_a_prefix)
        return execute(plan)

    monkeypatch.setattr(engine.runner, "execute", watch)
    first = engine.add_request(chat_prompts[0], PARAMS)
    outs: dict[str, list] = {}
    while not outs:  # until the first request decodes
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    later = [engine.add_request(p, PARAMS) for p in chat_prompts[1:3]]
    for rid, got in run_all(engine).items():
        outs.setdefault(rid, []).extend(got)
    assert any(mixed)
    for rid in [first, *later]:
        assert sum(len(o.new_token_ids) for o in outs[rid]) == PARAMS.max_tokens
        assert outs[rid][-1].finish_reason == "length"
    assert engine.stats().kv_blocks_used == 0 and engine.failed_steps == 0


def test_a_failed_step_fails_only_its_requests(make_engine, chat_prompts, monkeypatch):
    engine = make_engine(max_seqs=2)
    expected = [engine.generate([p], PARAMS)[0] for p in chat_prompts[:3]]
    # A device fault halfway through the layers: earlier layers have written this step's KV already.
    layer = engine.runner.model.layers[len(engine.runner.model.layers) // 2]
    armed = []

    def faulty(*args):
        if armed:
            armed.clear()
            raise DeviceFault("injected device fault")
        return type(layer).forward(layer, *args)

    monkeypatch.setattr(layer, "forward", faulty)
    a, b, c = (engine.add_request(p, PARAMS) for p in chat_prompts[:3])
    first = engine.step()  # a and b prefill and sample a token; c waits (max_seqs)
    assert sorted(o.request_id for o in first) == sorted([a, b]) and engine.stats().waiting == 1
    armed.append(True)
    with pytest.raises(EngineStepError) as err:
        engine.step()
    assert sorted(err.value.request_ids) == sorted([a, b])
    assert isinstance(err.value.__cause__, DeviceFault)
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 1, 0)
    assert stats.extra["failed_steps"] == 1 and stats.extra["consecutive_failed_steps"] == 1
    assert engine.abort(a) is None  # gone from the engine
    retried = engine.add_request(chat_prompts[0], PARAMS)  # the gateway's retry of a, on the same prefix cache
    done = run_all(engine)
    assert [t for o in done[c] for t in o.new_token_ids] == expected[2]
    assert [t for o in done[retried] for t in o.new_token_ids] == expected[0]
    assert a not in done and b not in done
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.extra["failed_steps"] == 1
    assert stats.extra["consecutive_failed_steps"] == 0


async def collect(aengine, prompt, params, **kw) -> list[int]:
    tokens = []
    async for out in aengine.generate(prompt, params, **kw):
        tokens += out.new_token_ids
    return tokens


def test_async_engine_fails_the_steps_requests_and_serves_on(make_engine, chat_prompts, monkeypatch):
    engine = make_engine(max_seqs=1)  # the victim runs alone; the others wait for their turn
    expected = engine.generate([chat_prompts[1]], PARAMS)[0]
    forward = engine.runner.forward

    def faulty(plan, hidden=None):
        if any(s.request.request_id == "victim" for s in plan.seqs):
            raise DeviceFault("injected device fault")
        return forward(plan, hidden)

    monkeypatch.setattr(engine.runner, "forward", faulty)

    async def main():
        aengine = AsyncEngine(engine)
        try:
            victim = asyncio.create_task(collect(aengine, chat_prompts[0], PARAMS, request_id="victim"))
            waiting = asyncio.create_task(collect(aengine, chat_prompts[1], PARAMS))
            with pytest.raises(EngineStepError, match="injected device fault") as err:
                await victim
            assert err.value.request_ids == ["victim"]
            later = await collect(aengine, chat_prompts[1], PARAMS)
            results = (await waiting, later, aengine.alive, aengine.health(), await aengine.call(engine.stats))
        finally:
            await aengine.close()
        return results

    waiting, later, alive, health, stats = asyncio.run(main())
    assert waiting == later == expected
    assert alive and health is None
    assert stats.running == stats.waiting == stats.kv_blocks_used == 0 and stats.extra["failed_steps"] == 1


def test_worker_reports_repeated_step_failures_in_health_and_recovers(make_engine, chat_prompts, monkeypatch):
    engine = make_engine()
    forward = engine.runner.forward
    broken = [True]

    def faulty(plan, hidden=None):
        if broken[0]:
            raise DeviceFault("injected device fault")
        return forward(plan, hidden)

    monkeypatch.setattr(engine.runner, "forward", faulty)
    request = pb.GenerateRequest(prompt_token_ids=chat_prompts[0], params=convert.sampling_to_proto(PARAMS))

    async def generate(stub) -> list[pb.GenerateChunk]:
        return [chunk async for chunk in stub.Generate(request)]

    async def main():
        aengine = AsyncEngine(engine, unhealthy_after=3)
        service = WorkerService(aengine, "smollm2-135m-instruct", "fingerprint")
        server, port = await serve_worker(aengine, service, "127.0.0.1", 0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.WorkerStub(channel)
        try:
            healths = []
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await generate(stub)
                assert err.value.code() == grpc.StatusCode.INTERNAL  # the gateway retries it elsewhere
                assert "injected device fault" in err.value.details()
                healths.append(await stub.Health(pb.HealthRequest()))
            probe_failing = await stub.Health(pb.HealthRequest(generate=True))
            assert aengine.alive
            broken[0] = False
            probe_fixed = await stub.Health(pb.HealthRequest(generate=True))  # its step succeeds: healthy again
            after = await stub.Health(pb.HealthRequest())
            chunks = await generate(stub)
            stats = await stub.Stats(pb.StatsRequest())
        finally:
            await channel.close()
            await server.stop(None)
            await aengine.close()
        return healths, probe_failing, probe_fixed, after, chunks, stats

    healths, probe_failing, probe_fixed, after, chunks, stats = asyncio.run(main())
    assert [h.ok for h in healths] == [True, True, False]
    assert "the last 3 engine steps failed" in healths[2].detail and "injected device fault" in healths[2].detail
    assert not probe_failing.ok and "injected device fault" in probe_failing.detail
    assert probe_fixed.ok and after.ok
    assert sum(len(c.token_ids) for c in chunks) == PARAMS.max_tokens and chunks[-1].finish_reason == "length"
    assert stats.running == stats.waiting == stats.kv_blocks_used == 0
