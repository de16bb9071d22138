from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stop_token_ids", "ignore_eos", "logprobs", "no_speculation")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NO_SPECULATION_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    min_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: int
    no_speculation: bool
    def __init__(self, max_tokens: _Optional[int] = ..., min_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., no_speculation: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "priority", "resumed_output_ids", "session_id", "session_ttl_s", "prefill_only", "kv_source")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    RESUMED_OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ONLY_FIELD_NUMBER: _ClassVar[int]
    KV_SOURCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: SamplingParams
    priority: int
    resumed_output_ids: _containers.RepeatedScalarFieldContainer[int]
    session_id: str
    session_ttl_s: float
    prefill_only: bool
    kv_source: KvSource
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ..., resumed_output_ids: _Optional[_Iterable[int]] = ..., session_id: _Optional[str] = ..., session_ttl_s: _Optional[float] = ..., prefill_only: _Optional[bool] = ..., kv_source: _Optional[_Union[KvSource, _Mapping]] = ...) -> None: ...

class KvSource(_message.Message):
    __slots__ = ("address", "transfer_id", "num_tokens", "deadline_s")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    address: str
    transfer_id: str
    num_tokens: int
    deadline_s: float
    def __init__(self, address: _Optional[str] = ..., transfer_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., deadline_s: _Optional[float] = ...) -> None: ...

class KvReceived(_message.Message):
    __slots__ = ("tokens", "cached_tokens", "bytes", "seconds", "fallback")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    cached_tokens: int
    bytes: int
    seconds: float
    fallback: str
    def __init__(self, tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., fallback: _Optional[str] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "top_token_ids", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("token_ids", "num_output_tokens", "num_prompt_tokens", "num_cached_tokens", "finish_reason", "logprobs", "queue_s", "first_token_s", "prefill_hops", "decode_hops", "decode_steps", "kv_received")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_HOPS_FIELD_NUMBER: _ClassVar[int]
    DECODE_HOPS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    KV_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_output_tokens: int
    num_prompt_tokens: int
    num_cached_tokens: int
    finish_reason: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    queue_s: float
    first_token_s: float
    prefill_hops: _containers.RepeatedCompositeFieldContainer[StageHop]
    decode_hops: _containers.RepeatedCompositeFieldContainer[StageHop]
    decode_steps: int
    kv_received: KvReceived
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., num_output_tokens: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., queue_s: _Optional[float] = ..., first_token_s: _Optional[float] = ..., prefill_hops: _Optional[_Iterable[_Union[StageHop, _Mapping]]] = ..., decode_hops: _Optional[_Iterable[_Union[StageHop, _Mapping]]] = ..., decode_steps: _Optional[int] = ..., kv_received: _Optional[_Union[KvReceived, _Mapping]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("running", "waiting", "kv_blocks_total", "kv_blocks_used", "kv_blocks_free", "kv_blocks_cached", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "steps", "kv_cache_bytes", "spec_draft_tokens", "spec_accepted_tokens", "decode_graphs_ready", "decode_graphs_pending")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPEC_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPEC_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_GRAPHS_READY_FIELD_NUMBER: _ClassVar[int]
    DECODE_GRAPHS_PENDING_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_cached: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    steps: int
    kv_cache_bytes: int
    spec_draft_tokens: int
    spec_accepted_tokens: int
    decode_graphs_ready: int
    decode_graphs_pending: int
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., kv_blocks_cached: _Optional[int] = ..., prefix_cache_queries: _Optional[int] = ..., prefix_cache_hits: _Optional[int] = ..., num_preemptions: _Optional[int] = ..., steps: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., spec_draft_tokens: _Optional[int] = ..., spec_accepted_tokens: _Optional[int] = ..., decode_graphs_ready: _Optional[int] = ..., decode_graphs_pending: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("generate",)
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    generate: bool
    def __init__(self, generate: _Optional[bool] = ...) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("ok", "detail", "latency_s")
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    detail: str
    latency_s: float
    def __init__(self, ok: _Optional[bool] = ..., detail: _Optional[str] = ..., latency_s: _Optional[float] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionReply(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class TokenizerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenizerFiles(_message.Message):
    __slots__ = ("model", "files", "fingerprint")
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    model: str
    files: _containers.ScalarMap[str, bytes]
    fingerprint: str
    def __init__(self, model: _Optional[str] = ..., files: _Optional[_Mapping[str, bytes]] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("request_id", "inputs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    inputs: _containers.RepeatedCompositeFieldContainer[TokenIds]
    def __init__(self, request_id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ...) -> None: ...

class EmbedReply(_message.Message):
    __slots__ = ("dimensions", "vectors", "prompt_tokens", "queue_s", "compute_s", "batches")
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    dimensions: int
    vectors: bytes
    prompt_tokens: int
    queue_s: float
    compute_s: float
    batches: int
    def __init__(self, dimensions: _Optional[int] = ..., vectors: _Optional[bytes] = ..., prompt_tokens: _Optional[int] = ..., queue_s: _Optional[float] = ..., compute_s: _Optional[float] = ..., batches: _Optional[int] = ...) -> None: ...

class StreamedRequest(_message.Message):
    __slots__ = ("start", "cancel", "log_id")
    START_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    start: GenerateRequest
    cancel: str
    log_id: str
    def __init__(self, start: _Optional[_Union[GenerateRequest, _Mapping]] = ..., cancel: _Optional[str] = ..., log_id: _Optional[str] = ...) -> None: ...

class StreamedChunk(_message.Message):
    __slots__ = ("request_id", "chunk", "error_code", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chunk: GenerateChunk
    error_code: int
    error: str
    def __init__(self, request_id: _Optional[str] = ..., chunk: _Optional[_Union[GenerateChunk, _Mapping]] = ..., error_code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class StreamedChunks(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[StreamedChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[StreamedChunk, _Mapping]]] = ...) -> None: ...

class KvFetchRequest(_message.Message):
    __slots__ = ("transfer_id", "start", "chunk_tokens")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    start: int
    chunk_tokens: int
    def __init__(self, transfer_id: _Optional[str] = ..., start: _Optional[int] = ..., chunk_tokens: _Optional[int] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("header", "start", "num_tokens", "data", "crc32")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    header: KvHeader
    start: int
    num_tokens: int
    data: bytes
    crc32: int
    def __init__(self, header: _Optional[_Union[KvHeader, _Mapping]] = ..., start: _Optional[int] = ..., num_tokens: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class KvHeader(_message.Message):
    __slots__ = ("token_ids", "end", "num_layers", "num_kv_heads", "head_dim", "dtype")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    end: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., end: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class StageSeq(_message.Message):
    __slots__ = ("start", "num_tokens", "block_table", "samples")
    START_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    start: int
    num_tokens: int
    block_table: _containers.RepeatedScalarFieldContainer[int]
    samples: bool
    def __init__(self, start: _Optional[int] = ..., num_tokens: _Optional[int] = ..., block_table: _Optional[_Iterable[int]] = ..., samples: _Optional[bool] = ...) -> None: ...

class StageHop(_message.Message):
    __slots__ = ("name", "layer_start", "layer_end", "compute_s", "transfer_s", "bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer_start: int
    layer_end: int
    compute_s: float
    transfer_s: float
    bytes: int
    def __init__(self, name: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., compute_s: _Optional[float] = ..., transfer_s: _Optional[float] = ..., bytes: _Optional[int] = ...) -> None: ...

class StageRoute(_message.Message):
    __slots__ = ("address", "name", "layer_start", "layer_end")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    address: str
    name: str
    layer_start: int
    layer_end: int
    def __init__(self, address: _Optional[str] = ..., name: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class StageOpen(_message.Message):
    __slots__ = ("weights_fingerprint", "num_layers", "kv_blocks", "route")
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    weights_fingerprint: str
    num_layers: int
    kv_blocks: int
    route: _containers.RepeatedCompositeFieldContainer[StageRoute]
    def __init__(self, weights_fingerprint: _Optional[str] = ..., num_layers: _Optional[int] = ..., kv_blocks: _Optional[int] = ..., route: _Optional[_Iterable[_Union[StageRoute, _Mapping]]] = ...) -> None: ...

class StageStep(_message.Message):
    __slots__ = ("step", "seqs", "hidden", "hops", "sent_unix")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_FIELD_NUMBER: _ClassVar[int]
    step: int
    seqs: _containers.RepeatedCompositeFieldContainer[StageSeq]
    hidden: Tensor
    hops: _containers.RepeatedCompositeFieldContainer[StageHop]
    sent_unix: float
    def __init__(self, step: _Optional[int] = ..., seqs: _Optional[_Iterable[_Union[StageSeq, _Mapping]]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., hops: _Optional[_Iterable[_Union[StageHop, _Mapping]]] = ..., sent_unix: _Optional[float] = ...) -> None: ...

class StageMessage(_message.Message):
    __slots__ = ("open", "step")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    open: StageOpen
    step: StageStep
    def __init__(self, open: _Optional[_Union[StageOpen, _Mapping]] = ..., step: _Optional[_Union[StageStep, _Mapping]] = ...) -> None: ...

class StageReply(_message.Message):
    __slots__ = ("step", "hidden", "hops", "error", "opened", "sent_unix")
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_FIELD_NUMBER: _ClassVar[int]
    step: int
    hidden: Tensor
    hops: _containers.RepeatedCompositeFieldContainer[StageHop]
    error: str
    opened: bool
    sent_unix: float
    def __init__(self, step: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., hops: _Optional[_Iterable[_Union[StageHop, _Mapping]]] = ..., error: _Optional[str] = ..., opened: _Optional[bool] = ..., sent_unix: _Optional[float] = ...) -> None: ...

class StageAssignment(_message.Message):
    __slots__ = ("model", "weights_fingerprint", "layer_start", "layer_end", "num_layers", "kv_blocks", "downstream", "depth", "release", "name")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights_fingerprint: str
    layer_start: int
    layer_end: int
    num_layers: int
    kv_blocks: int
    downstream: _containers.RepeatedCompositeFieldContainer[StageRoute]
    depth: int
    release: bool
    name: str
    def __init__(self, model: _Optional[str] = ..., weights_fingerprint: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., num_layers: _Optional[int] = ..., kv_blocks: _Optional[int] = ..., downstream: _Optional[_Iterable[_Union[StageRoute, _Mapping]]] = ..., depth: _Optional[int] = ..., release: _Optional[bool] = ..., name: _Optional[str] = ...) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("ok", "detail", "kv_blocks", "layer_start", "layer_end", "weight_bytes", "kv_cache_bytes", "max_model_len")
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    detail: str
    kv_blocks: int
    layer_start: int
    layer_end: int
    weight_bytes: int
    kv_cache_bytes: int
    max_model_len: int
    def __init__(self, ok: _Optional[bool] = ..., detail: _Optional[str] = ..., kv_blocks: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., max_model_len: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("name", "address", "model", "role", "layer_start", "layer_end", "kv_blocks_total", "block_size", "device", "memory_cap_bytes", "max_model_len", "tokenizer_fingerprint", "model_version", "max_num_seqs", "architecture", "dtype", "num_layers", "stage", "kind", "embedding_dimensions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CAP_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    model: str
    role: str
    layer_start: int
    layer_end: int
    kv_blocks_total: int
    block_size: int
    device: str
    memory_cap_bytes: int
    max_model_len: int
    tokenizer_fingerprint: str
    model_version: str
    max_num_seqs: int
    architecture: str
    dtype: str
    num_layers: int
    stage: StageProfile
    kind: str
    embedding_dimensions: int
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., model: _Optional[str] = ..., role: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., block_size: _Optional[int] = ..., device: _Optional[str] = ..., memory_cap_bytes: _Optional[int] = ..., max_model_len: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., model_version: _Optional[str] = ..., max_num_seqs: _Optional[int] = ..., architecture: _Optional[str] = ..., dtype: _Optional[str] = ..., num_layers: _Optional[int] = ..., stage: _Optional[_Union[StageProfile, _Mapping]] = ..., kind: _Optional[str] = ..., embedding_dimensions: _Optional[int] = ...) -> None: ...

class StageProfile(_message.Message):
    __slots__ = ("layer_bytes", "embed_bytes", "lm_head_bytes", "lm_head_read_bytes", "kv_bytes_per_token", "layer_seconds", "weights_fingerprint")
    LAYER_BYTES_FIELD_NUMBER: _ClassVar[int]
    EMBED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LM_HEAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    LM_HEAD_READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LAYER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    layer_bytes: int
    embed_bytes: int
    lm_head_bytes: int
    lm_head_read_bytes: int
    kv_bytes_per_token: int
    layer_seconds: float
    weights_fingerprint: str
    def __init__(self, layer_bytes: _Optional[int] = ..., embed_bytes: _Optional[int] = ..., lm_head_bytes: _Optional[int] = ..., lm_head_read_bytes: _Optional[int] = ..., kv_bytes_per_token: _Optional[int] = ..., layer_seconds: _Optional[float] = ..., weights_fingerprint: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("info", "token")
    INFO_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    info: WorkerInfo
    token: str
    def __init__(self, info: _Optional[_Union[WorkerInfo, _Mapping]] = ..., token: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("worker_id", "heartbeat_interval_s", "session_secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    SESSION_SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    heartbeat_interval_s: float
    session_secret: str
    def __init__(self, worker_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., session_secret: _Optional[str] = ...) -> None: ...

class HeartbeatReport(_message.Message):
    __slots__ = ("worker_id", "stats", "recent_first_token_s", "recent_inter_token_s", "draining", "block_hashes", "session_secret", "stage_fault", "pipeline", "sessions")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    RECENT_INTER_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    SESSION_SECRET_FIELD_NUMBER: _ClassVar[int]
    STAGE_FAULT_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    stats: WorkerStats
    recent_first_token_s: float
    recent_inter_token_s: float
    draining: bool
    block_hashes: BlockHashDelta
    session_secret: str
    stage_fault: str
    pipeline: PipelineReport
    sessions: _containers.RepeatedCompositeFieldContainer[PinnedSession]
    def __init__(self, worker_id: _Optional[str] = ..., stats: _Optional[_Union[WorkerStats, _Mapping]] = ..., recent_first_token_s: _Optional[float] = ..., recent_inter_token_s: _Optional[float] = ..., draining: _Optional[bool] = ..., block_hashes: _Optional[_Union[BlockHashDelta, _Mapping]] = ..., session_secret: _Optional[str] = ..., stage_fault: _Optional[str] = ..., pipeline: _Optional[_Union[PipelineReport, _Mapping]] = ..., sessions: _Optional[_Iterable[_Union[PinnedSession, _Mapping]]] = ...) -> None: ...

class PinnedSession(_message.Message):
    __slots__ = ("session_id", "tokens", "blocks", "idle_s", "ttl_left_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    TTL_LEFT_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tokens: int
    blocks: int
    idle_s: float
    ttl_left_s: float
    def __init__(self, session_id: _Optional[str] = ..., tokens: _Optional[int] = ..., blocks: _Optional[int] = ..., idle_s: _Optional[float] = ..., ttl_left_s: _Optional[float] = ...) -> None: ...

class PipelineReport(_message.Message):
    __slots__ = ("stages", "depth", "bubble", "hops", "mean_hops", "steps")
    STAGES_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    BUBBLE_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    MEAN_HOPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    stages: int
    depth: int
    bubble: float
    hops: _containers.RepeatedCompositeFieldContainer[StageHop]
    mean_hops: _containers.RepeatedCompositeFieldContainer[StageHop]
    steps: int
    def __init__(self, stages: _Optional[int] = ..., depth: _Optional[int] = ..., bubble: _Optional[float] = ..., hops: _Optional[_Iterable[_Union[StageHop, _Mapping]]] = ..., mean_hops: _Optional[_Iterable[_Union[StageHop, _Mapping]]] = ..., steps: _Optional[int] = ...) -> None: ...

class BlockHashDelta(_message.Message):
    __slots__ = ("reset", "added", "removed")
    RESET_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    added: _containers.RepeatedScalarFieldContainer[int]
    removed: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, reset: _Optional[bool] = ..., added: _Optional[_Iterable[int]] = ..., removed: _Optional[_Iterable[int]] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("kind", "detail")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NONE: _ClassVar[Command.Kind]
        DRAIN: _ClassVar[Command.Kind]
        REREGISTER: _ClassVar[Command.Kind]
        STOP: _ClassVar[Command.Kind]
        REFUSED: _ClassVar[Command.Kind]
    NONE: Command.Kind
    DRAIN: Command.Kind
    REREGISTER: Command.Kind
    STOP: Command.Kind
    REFUSED: Command.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: Command.Kind
    detail: str
    def __init__(self, kind: _Optional[_Union[Command.Kind, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class HeartbeatBatch(_message.Message):
    __slots__ = ("reports",)
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[HeartbeatReport]
    def __init__(self, reports: _Optional[_Iterable[_Union[HeartbeatReport, _Mapping]]] = ...) -> None: ...

class WorkerCommand(_message.Message):
    __slots__ = ("worker_id", "command")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    command: Command
    def __init__(self, worker_id: _Optional[str] = ..., command: _Optional[_Union[Command, _Mapping]] = ...) -> None: ...

class CommandBatch(_message.Message):
    __slots__ = ("commands",)
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    commands: _containers.RepeatedCompositeFieldContainer[WorkerCommand]
    def __init__(self, commands: _Optional[_Iterable[_Union[WorkerCommand, _Mapping]]] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("worker_id", "token", "session_secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SESSION_SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    token: str
    session_secret: str
    def __init__(self, worker_id: _Optional[str] = ..., token: _Optional[str] = ..., session_secret: _Optional[str] = ...) -> None: ...

class DeregisterReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("name", "host", "cpus", "memory_bytes", "gpus", "max_workers", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    host: str
    cpus: int
    memory_bytes: int
    gpus: int
    max_workers: int
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., host: _Optional[str] = ..., cpus: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., gpus: _Optional[int] = ..., max_workers: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class NodeWorker(_message.Message):
    __slots__ = ("name", "model", "role", "state", "pid", "restarts", "last_exit_code", "last_lines", "next_start_in_s", "uptime_s", "crashes", "launch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    LAST_LINES_FIELD_NUMBER: _ClassVar[int]
    NEXT_START_IN_S_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    CRASHES_FIELD_NUMBER: _ClassVar[int]
    LAUNCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    role: str
    state: str
    pid: int
    restarts: int
    last_exit_code: int
    last_lines: _containers.RepeatedScalarFieldContainer[str]
    next_start_in_s: float
    uptime_s: float
    crashes: int
    launch: WorkerLaunch
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., role: _Optional[str] = ..., state: _Optional[str] = ..., pid: _Optional[int] = ..., restarts: _Optional[int] = ..., last_exit_code: _Optional[int] = ..., last_lines: _Optional[_Iterable[str]] = ..., next_start_in_s: _Optional[float] = ..., uptime_s: _Optional[float] = ..., crashes: _Optional[int] = ..., launch: _Optional[_Union[WorkerLaunch, _Mapping]] = ...) -> None: ...

class NodeReport(_message.Message):
    __slots__ = ("info", "workers", "plan_version")
    INFO_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    info: NodeInfo
    workers: _containers.RepeatedCompositeFieldContainer[NodeWorker]
    plan_version: int
    def __init__(self, info: _Optional[_Union[NodeInfo, _Mapping]] = ..., workers: _Optional[_Iterable[_Union[NodeWorker, _Mapping]]] = ..., plan_version: _Optional[int] = ...) -> None: ...

class WorkerLaunch(_message.Message):
    __slots__ = ("name", "model", "role", "device", "threads", "memory_mb", "kv_cache_mb")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_MB_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    role: str
    device: str
    threads: int
    memory_mb: int
    kv_cache_mb: int
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., role: _Optional[str] = ..., device: _Optional[str] = ..., threads: _Optional[int] = ..., memory_mb: _Optional[int] = ..., kv_cache_mb: _Optional[int] = ...) -> None: ...

class NodePlan(_message.Message):
    __slots__ = ("version", "workers", "node_id", "report_interval_s")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    version: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerLaunch]
    node_id: str
    report_interval_s: float
    def __init__(self, version: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerLaunch, _Mapping]]] = ..., node_id: _Optional[str] = ..., report_interval_s: _Optional[float] = ...) -> None: ...
