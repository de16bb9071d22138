"""The one boundary between protobuf messages and the engine's dataclasses, both directions."""

from __future__ import annotations

from fleetserve.contract import EngineStats, RequestOutput, SamplingParams, StageHop, StageSeq, TokenLogprob
from fleetserve.protocol import fleet_pb2 as pb


def sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_tokens=p.max_tokens,
        min_tokens=p.min_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        stop_token_ids=p.stop_token_ids,
        ignore_eos=p.ignore_eos,
        no_speculation=not p.speculative,
    )
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """The engine's SamplingParams (not yet validated: the engine validates on add_request)."""
    return SamplingParams(
        max_tokens=msg.max_tokens,
        min_tokens=msg.min_tokens,
        # float32 on the wire: round back so 0.7 stays 0.7 for the engine's range checks
        temperature=round(msg.temperature, 6),
        top_p=round(msg.top_p, 6),
        top_k=msg.top_k,
        min_p=round(msg.min_p, 6),
        presence_penalty=round(msg.presence_penalty, 6),
        frequency_penalty=round(msg.frequency_penalty, 6),
        repetition_penalty=round(msg.repetition_penalty, 6),
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        speculative=not msg.no_speculation,
    )


def output_to_chunk(out: RequestOutput, first: bool = False, queue_s: float = 0.0) -> pb.GenerateChunk:
    chunk = pb.GenerateChunk(
        token_ids=out.new_token_ids,
        num_output_tokens=out.num_output_tokens,
        num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
        finish_reason=out.finish_reason or "",
    )
    if first and out.first_token_time is not None:
        chunk.first_token_s = out.first_token_time - out.arrival_time
        chunk.queue_s = queue_s
    chunk.prefill_hops.extend(hop_to_proto(h) for h in out.prefill_hops or ())
    chunk.decode_hops.extend(hop_to_proto(h) for h in out.decode_hops or ())
    chunk.decode_steps = out.decode_steps
    for lp in out.logprobs or ():
        chunk.logprobs.append(
            pb.TokenLogprob(
                token_id=lp.token_id,
                logprob=lp.logprob,
                top_token_ids=[t for t, _ in lp.top],
                top_logprobs=[v for _, v in lp.top],
            )
        )
    return chunk


def logprobs_from_chunk(chunk: pb.GenerateChunk) -> list[TokenLogprob]:
    return [
        TokenLogprob(lp.token_id, lp.logprob, list(zip(lp.top_token_ids, lp.top_logprobs))) for lp in chunk.logprobs
    ]


def stats_to_proto(s: EngineStats) -> pb.WorkerStats:
    return pb.WorkerStats(
        running=s.running,
        waiting=s.waiting,
        kv_blocks_total=s.kv_blocks_total,
        kv_blocks_used=s.kv_blocks_used,
        kv_blocks_free=s.kv_blocks_free,
        kv_blocks_cached=s.kv_blocks_cached,
        prefix_cache_queries=s.prefix_cache_queries,
        prefix_cache_hits=s.prefix_cache_hits,
        num_preemptions=s.num_preemptions,
        steps=s.steps,
        kv_cache_bytes=s.kv_cache_bytes,
        spec_draft_tokens=s.spec_draft_tokens,
        spec_accepted_tokens=s.spec_accepted_tokens,
        decode_graphs_ready=s.decode_graphs_ready,
        decode_graphs_pending=s.decode_graphs_pending,
    )


# -- pipeline stages ---------------------------------------------------------------------------------------------


def stage_seqs_to_proto(seqs: list[StageSeq]) -> list[pb.StageSeq]:
    return [
        pb.StageSeq(start=s.start, num_tokens=s.num_tokens, block_table=s.block_table, samples=s.samples) for s in seqs
    ]


def stage_seqs_from_proto(msgs) -> list[StageSeq]:
    return [StageSeq(m.start, m.num_tokens, list(m.block_table), m.samples) for m in msgs]


def hop_to_proto(hop: StageHop) -> pb.StageHop:
    return pb.StageHop(
        name=hop.name,
        layer_start=hop.layer_start,
        layer_end=hop.layer_end,
        compute_s=hop.compute_s,
        transfer_s=hop.transfer_s,
        bytes=hop.bytes,
    )


def hop_from_proto(msg: pb.StageHop) -> StageHop:
    return StageHop(msg.name, msg.layer_start, msg.layer_end, msg.compute_s, msg.transfer_s, msg.bytes)
