"""Many generations over one GenerateStreams call, on a real engine behind the real Worker gRPC service: the same
tokens as Generate calls, the chunks of one step's generations in one message, a refusal that ends only its own
generation, a cancelled one aborted on the engine while the others finish; and the gateway's side of it, which
falls back to a Generate call each for a worker without it."""

import asyncio

import grpc
import pytest

from fleetserve.bench.sim_workers import FixedAnswerWorker
from fleetserve.contract import SamplingParams
from fleetserve.engine.async_engine import AsyncEngine
from fleetserve.gateway.token_streams import TokenStreams
from fleetserve.protocol import convert
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.worker.server import WorkerService, serve_worker

pytestmark = pytest.mark.slow

TOKENS = 12


def request(rid: str, prompt: list[int], max_tokens: int = TOKENS, priority: int = 0) -> pb.GenerateRequest:
    params = convert.sampling_to_proto(SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0))
    return pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, params=params, priority=priority)


async def with_worker(make_engine, body, stream_interval: int = 1):
    aengine = AsyncEngine(make_engine(), stream_interval=stream_interval, stream_max_wait_s=60.0)
    service = WorkerService(aengine, "smollm2-135m-instruct", "fingerprint")
    server, port = await serve_worker(aengine, service, "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        return await body(pb_grpc.WorkerStub(channel), aengine)
    finally:
        await channel.close()
        await server.stop(None)
        await aengine.close()


def test_one_call_carries_several_generations_as_generate_calls_would(make_engine, chat_prompts):
    async def body(stub, aengine):
        alone = {}
        for i in range(3):
            chunks = [c async for c in stub.Generate(request(f"g{i}", chat_prompts[i]))]
            alone[f"s{i}"] = [t for c in chunks for t in c.token_ids]

        outgoing: asyncio.Queue = asyncio.Queue()

        async def messages():
            while (message := await outgoing.get()) is not None:
                yield message

        for i in range(3):
            outgoing.put_nowait(pb.StreamedRequest(start=request(f"s{i}", chat_prompts[i]), log_id=f"log-{i}"))
        outgoing.put_nowait(pb.StreamedRequest(start=request("bad", chat_prompts[0], priority=-5000)))
        outgoing.put_nowait(pb.StreamedRequest(start=request("s0", chat_prompts[0])))  # an id already running
        streamed: dict[str, list] = {}
        errors, batches = {}, []
        async for batch in stub.GenerateStreams(messages(), timeout=120):
            batches.append([entry.request_id for entry in batch.chunks])
            for entry in batch.chunks:
                if entry.error_code:
                    errors[entry.request_id] = entry
                    continue
                streamed.setdefault(entry.request_id, []).append(entry.chunk)
            if all(s and s[-1].finish_reason for s in streamed.values()) and len(streamed) == 3:
                outgoing.put_nowait(None)  # the gateway closes its side: the call ends, its generations done
        return alone, streamed, errors, batches, aengine.engine.stats()

    alone, streamed, errors, batches, stats = asyncio.run(with_worker(make_engine, body))
    for rid, chunks in streamed.items():
        assert [t for c in chunks for t in c.token_ids] == alone[rid]  # greedy: the tokens Generate gave
        assert chunks[-1].finish_reason == "length" and chunks[0].num_prompt_tokens > 0
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert errors["bad"].error_code == invalid and "priority must be between" in errors["bad"].error
    assert errors["s0"].error_code == invalid and "request_id of its own" in errors["s0"].error
    # The decode steps' chunks of all three went out together, not a message per generation.
    assert sum(1 for ids in batches if set(ids) == {"s0", "s1", "s2"}) >= TOKENS // 2
    assert stats.running == stats.waiting == stats.kv_blocks_used == 0


def test_a_cancelled_generation_is_aborted_and_the_others_finish(make_engine, chat_prompts):
    async def body(stub, aengine):
        outgoing: asyncio.Queue = asyncio.Queue()

        async def messages():
            while (message := await outgoing.get()) is not None:
                yield message

        outgoing.put_nowait(pb.StreamedRequest(start=request("long", chat_prompts[0], max_tokens=400)))
        outgoing.put_nowait(pb.StreamedRequest(start=request("short", chat_prompts[1], max_tokens=30)))
        tokens: dict[str, int] = {"long": 0, "short": 0}
        running_after_cancel = None
        async for batch in stub.GenerateStreams(messages(), timeout=120):
            for entry in batch.chunks:
                tokens[entry.request_id] += len(entry.chunk.token_ids)
                if entry.request_id == "long" and tokens["long"] >= 5 and running_after_cancel is None:
                    outgoing.put_nowait(pb.StreamedRequest(cancel="long"))
                    running_after_cancel = False
                if entry.request_id == "short" and entry.chunk.finish_reason:
                    running_after_cancel = aengine.stats().running
                    outgoing.put_nowait(None)
        return tokens, running_after_cancel, aengine.engine.stats()

    tokens, running, stats = asyncio.run(with_worker(make_engine, body))
    assert tokens["short"] == 30
    assert 5 <= tokens["long"] < 400  # aborted on the engine, not run to its end
    assert running == 0
    assert stats.running == stats.waiting == stats.kv_blocks_used == 0


def test_the_gateway_streams_through_one_call_and_falls_back_to_generate_where_a_worker_lacks_it(
    make_engine, chat_prompts, model_dir
):
    async def body(stub, aengine):
        streams = TokenStreams(stub)
        got = [c async for c in streams.chunks(request("t0", chat_prompts[0]), "log-t0")]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            _ = [c async for c in streams.chunks(request("t1", chat_prompts[0], priority=-5000), "log-t1")]
        server = grpc.aio.server()
        pb_grpc.add_WorkerServicer_to_server(FixedAnswerWorker(model_dir), server)  # Generate only
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                older = TokenStreams(pb_grpc.WorkerStub(channel))
                answer = [c async for c in older.chunks(request("o0", [1, 2, 3], max_tokens=2), "log-o0")]
        finally:
            await server.stop(None)
        return streams, got, refused.value, older, answer

    streams, got, refused, older, answer = asyncio.run(with_worker(make_engine, body))
    assert streams.supported and sum(len(c.token_ids) for c in got) == TOKENS and got[-1].finish_reason
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority" in refused.details()
    assert not older.supported and [len(c.token_ids) for c in answer] == [1, 1] and answer[-1].finish_reason


def test_a_worker_with_a_stream_interval_sends_tokens_in_groups(make_engine, chat_prompts):
    async def body(stub, aengine):
        chunks = [c async for c in stub.Generate(request("g", chat_prompts[0]))]
        outgoing = [pb.StreamedRequest(start=request("s", chat_prompts[0]))]

        async def messages():
            for message in outgoing:
                yield message
            await asyncio.sleep(60)  # the call ends when its generation has, not when this side closes

        streamed = []
        async for batch in stub.GenerateStreams(messages(), timeout=120):
            streamed += [entry.chunk for entry in batch.chunks]
            if streamed and streamed[-1].finish_reason:
                break
        return chunks, streamed

    chunks, streamed = asyncio.run(with_worker(make_engine, body, stream_interval=4))
    for got in (chunks, streamed):
        assert [len(c.token_ids) for c in got] == [1, 4, 4, 3]  # the first at once, then groups, the rest last
        assert [c.num_output_tokens for c in got] == [1, 5, 9, 12] and got[-1].finish_reason == "length"
    assert [t for c in chunks for t in c.token_ids] == [t for c in streamed for t in c.token_ids]  # greedy
