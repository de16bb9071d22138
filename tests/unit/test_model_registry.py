"""The model registry: config shapes, validation, learning from workers, defaults and policies."""

import json

import pytest

from fleetserve.gateway.models import DEFAULT_POLICY, ModelRegistry, ModelSpec, is_quantized_dtype
from fleetserve.protocol import fleet_pb2 as pb


def worker(model="m", **kw):
    kw.setdefault("name", "w")
    kw.setdefault("address", "127.0.0.1:1")
    return pb.WorkerInfo(model=model, **kw)


# -- accepted shapes ----------------------------------------------------------------------------------------


def test_a_list_of_models_with_names():
    reg = ModelRegistry.from_config(
        [
            {"name": "a", "version": "2", "policy": "round-robin", "temperature": 0.5},
            {"name": "b", "batchable": False, "context_length": 4096},
        ]
    )
    assert reg.names() == ["a", "b"]
    a, b = reg.get("a"), reg.get("b")
    assert a.version == "2" and a.policy == "round-robin" and a.temperature == 0.5 and a.configured
    assert not b.batchable and b.context_length == 4096 and b.policy == DEFAULT_POLICY
    assert reg.get("c") is None


def test_a_mapping_of_names_and_the_wrapped_forms():
    mapping = {"a": {"dtype": "bfloat16"}, "b": None}
    for data in (mapping, {"models": mapping}, {"models": [{"name": "a", "dtype": "bfloat16"}, {"name": "b"}]}):
        reg = ModelRegistry.from_config(data)
        assert reg.names() == ["a", "b"]
        assert reg.get("a").dtype == "bfloat16" and reg.get("b") == ModelSpec("b")


def test_empty_configs_give_an_empty_registry():
    for data in (None, [], {}, {"models": None}, {"models": []}):
        assert len(ModelRegistry.from_config(data)) == 0


def test_a_model_named_models_is_not_taken_for_the_wrapper():
    reg = ModelRegistry.from_config({"models": {"version": "1"}})
    assert reg.names() == ["models"] and reg.get("models").version == "1"


def test_the_model_configs_json_shape_with_aliases_and_nested_defaults(tmp_path):
    data = {
        "llama-7b": {
            "version": "1.1",
            "path": "/models/llama",
            "architecture": "LlamaForCausalLM",
            "layers": 32,
            "dtype": "q4_k_m",
            "max_context": 8192,
            "default_params": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 256},
        },
        "tiny": {"source": "tiny.whl", "num_layers": 2, "max_model_len": 512, "sampling": {"temperature": 0}},
        "mid": {"context_length": 1024, "defaults": {"top_p": 1}, "max_tokens": 64},
    }
    path = tmp_path / "model_configs.json"
    path.write_text(json.dumps(data))
    reg = ModelRegistry.load(path)
    llama = reg.get("llama-7b")
    assert (llama.version, llama.source, llama.architecture, llama.num_layers) == (
        "1.1",
        "/models/llama",
        "LlamaForCausalLM",
        32,
    )
    assert llama.dtype == "q4_k_m" and llama.quantized  # derived from the dtype when not given
    assert llama.context_length == 8192 and (llama.temperature, llama.top_p, llama.max_tokens) == (0.7, 0.9, 256)
    tiny = reg.get("tiny")
    assert tiny.source == "tiny.whl" and tiny.num_layers == 2 and tiny.context_length == 512
    assert tiny.temperature == 0.0 and isinstance(tiny.temperature, float) and tiny.top_p is None
    mid = reg.get("mid")
    assert mid.context_length == 1024 and mid.top_p == 1.0 and mid.max_tokens == 64


def test_yaml_files_and_policy_mappings(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        "  - name: a\n"
        "    version: 3\n"
        "    policy: {name: power-of-two, sample: 3}\n"
        "  - name: b\n"
        "    policy: least-connections\n"
        "    policy_options: {weight: 2}\n"
        "    quantized: false\n"
        "    dtype: int8\n"
    )
    reg = ModelRegistry.load(path)
    assert reg.get("a").version == "3"
    assert reg.policy_for("a") == ("power-of-two", {"sample": 3})
    assert reg.policy_for("b") == ("least-connections", {"weight": 2})
    assert not reg.get("b").quantized  # an explicit setting wins over the dtype's name
    (tmp_path / "m.yml").write_text("a: {top_p: 0.5}\n")
    assert ModelRegistry.load(tmp_path / "m.yml").get("a").top_p == 0.5


# -- refused configs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, words",
    [
        ({"a": {"colour": "red"}}, ["'a'", "colour"]),
        ({"a": {"default_params": {"seed": 1}}}, ["'a'", "default_params.seed"]),
        ([{"name": "a", "layers": "32"}], ["'a'", "layers", "integer"]),
        ({"a": {"num_layers": -1}}, ["'a'", "num_layers"]),
        ({"a": {"num_layers": True}}, ["'a'", "num_layers"]),
        ({"a": {"quantized": "yes"}}, ["'a'", "quantized"]),
        ({"a": {"temperature": "hot"}}, ["'a'", "temperature"]),
        ({"a": {"temperature": -0.1}}, ["'a'", "temperature"]),
        ({"a": {"top_p": 0}}, ["'a'", "top_p"]),
        ({"a": {"sampling": {"max_tokens": 0}}}, ["'a'", "sampling.max_tokens"]),
        ({"a": {"version": 1.1}}, ["'a'", "version"]),
        ({"a": {"policy": ""}}, ["'a'", "policy"]),
        ({"a": {"policy": {"sample": 2}}}, ["'a'", "policy.name"]),
        ({"a": {"policy_options": [1]}}, ["'a'", "policy_options"]),
        ({"a": {"layers": 2, "num_layers": 2}}, ["'a'", "layers", "num_layers"]),
        ({"a": {"temperature": 1, "defaults": {"temperature": 1}}}, ["'a'", "temperature"]),
        ({"a": {"name": "b"}}, ["'a'", "name"]),
        ({"a": {"defaults": 3}}, ["'a'", "defaults"]),
        ({"a": [1, 2]}, ["'a'", "mapping"]),
        ([{"version": "1"}], ["models[0]", "name"]),
        (["a"], ["models[0]"]),
        ([{"name": "a"}, {"name": "a"}], ["'a'", "twice"]),
        ("a", ["list"]),
    ],
)
def test_bad_configs_are_refused_naming_the_model_and_the_key(data, words):
    with pytest.raises(ValueError) as err:
        ModelRegistry.from_config(data)
    for word in words:
        assert word in str(err.value)


def test_bad_files_are_refused_naming_the_file(tmp_path):
    bad_json = tmp_path / "m.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="m.json"):
        ModelRegistry.load(bad_json)
    bad_yaml = tmp_path / "m.yaml"
    bad_yaml.write_text("a: [unclosed\n")
    with pytest.raises(ValueError, match="m.yaml"):
        ModelRegistry.load(bad_yaml)
    bad_key = tmp_path / "k.yaml"
    bad_key.write_text("a: {colour: red}\n")
    with pytest.raises(ValueError, match=r"k\.yaml.*'a'.*colour"):
        ModelRegistry.load(bad_key)
    with pytest.raises(OSError):
        ModelRegistry.load(tmp_path / "missing.json")


# -- learning from workers ----------------------------------------------------------------------------------


def test_learn_fills_only_the_gaps_of_a_configured_model():
    reg = ModelRegistry.from_config({"m": {"version": "v1", "num_layers": 30, "temperature": 0.2}})
    spec = reg.learn(
        worker(model_version="v2", architecture="LlamaForCausalLM", num_layers=12, dtype="bfloat16", max_model_len=2048)
    )
    assert spec is reg.get("m") and spec.configured
    assert spec.version == "v1" and spec.num_layers == 30  # the config's values stay
    assert spec.architecture == "LlamaForCausalLM" and spec.dtype == "bfloat16" and spec.context_length == 2048
    assert not spec.quantized and spec.temperature == 0.2
    reg.learn(worker(architecture="Other", max_model_len=4096))
    assert spec.architecture == "LlamaForCausalLM" and spec.context_length == 2048


def test_learn_creates_an_unconfigured_model_from_a_worker():
    reg = ModelRegistry()
    spec = reg.learn(
        worker("gguf-model", model_version="abc", architecture="llama", num_layers=22, dtype="q8_0", max_model_len=512)
    )
    assert reg.names() == ["gguf-model"] and not spec.configured
    assert (spec.version, spec.architecture, spec.num_layers, spec.dtype, spec.context_length) == (
        "abc",
        "llama",
        22,
        "q8_0",
        512,
    )
    assert spec.quantized and spec.batchable and spec.policy == DEFAULT_POLICY
    assert reg.learn(worker("gguf-model", name="w2")) is spec  # a second worker finds it


def test_learn_tolerates_workers_that_report_little():
    spec = ModelRegistry().learn(worker("bare"))
    assert spec == ModelSpec("bare", kind="generate", configured=False)  # a worker that names no kind generates


def test_a_model_has_one_kind():
    reg = ModelRegistry.from_config({"embedder": {"kind": "embed"}})
    spec = reg.learn(worker("embedder", kind="embed", embedding_dimensions=384, max_model_len=256))
    assert (spec.kind, spec.dimensions, spec.context_length) == ("embed", 384, 256)
    with pytest.raises(ValueError, match="kind 'generate'.*known as kind 'embed'"):
        reg.learn(worker("embedder", name="llm"))  # an LLM worker registering under the embedding model's name
    with pytest.raises(ValueError, match="'kind' must be one of generate, embed"):
        ModelRegistry.from_config({"m": {"kind": "rerank"}})


def test_quantized_dtype_names():
    for dtype in ("q8_0", "Q4_K_M", "q4_0", "iq4_xs", "int8", "int4", "fp8", "nf4"):
        assert is_quantized_dtype(dtype), dtype
    for dtype in ("float32", "bfloat16", "float16", "", "auto"):
        assert not is_quantized_dtype(dtype), dtype


def test_restore_brings_back_learned_models_and_fills_gaps_of_configured_ones():
    saved = ModelSpec("old", version="7", num_layers=4, policy="random", configured=True).to_json()
    saved["from_a_later_version"] = 1
    reg = ModelRegistry.from_config({"cfg": {"temperature": 0.1}})
    old = reg.restore(saved)
    assert reg.get("old") is old and not old.configured and old.version == "7" and old.num_layers == 4
    cfg = reg.restore(ModelSpec("cfg", version="2", temperature=0.9, configured=False).to_json())
    assert cfg.configured and cfg.version == "2" and cfg.temperature == 0.1


def test_to_json_is_json_and_round_trips():
    spec = ModelSpec("a", version="1", policy_options={"k": [1, 2]}, temperature=0.3)
    data = json.loads(json.dumps(spec.to_json()))
    assert data["name"] == "a" and data["policy"] == DEFAULT_POLICY and data["configured"] is True
    assert ModelSpec.from_json(data) == spec
    data["policy_options"]["k"].append(3)
    assert spec.policy_options == {"k": [1, 2]}


# -- per-request use ----------------------------------------------------------------------------------------


def test_apply_defaults_fills_only_what_the_request_left_out():
    reg = ModelRegistry.from_config({"m": {"defaults": {"temperature": 0.7, "max_tokens": 100}}, "n": {}})
    assert reg.apply_defaults("m", None, None, None) == (0.7, None, 100)
    assert reg.apply_defaults("m", 0.0, 0.5, 5) == (0.0, 0.5, 5)
    assert reg.apply_defaults("n", None, 0.9, None) == (None, 0.9, None)
    assert reg.apply_defaults("unknown", 1.0, None, None) == (1.0, None, None)


def test_policy_for_defaults_to_prefix_aware_and_hands_out_copies():
    reg = ModelRegistry.from_config([{"name": "m", "policy": "random", "policy_options": {"seed": 1}}, {"name": "n"}])
    assert reg.policy_for("n") == (DEFAULT_POLICY, {}) == reg.policy_for("unknown")
    name, options = reg.policy_for("m")
    options["seed"] = 2
    assert reg.policy_for("m") == ("random", {"seed": 1})
    assert DEFAULT_POLICY == "prefix-aware"
