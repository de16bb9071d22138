"""A zipped model folder is unpacked once into the cache, atomically, and never outside its folder."""

from __future__ import annotations

import json
import zipfile

import pytest

from fleetserve.errors import UnsupportedModelError
from fleetserve.model_files import catalog, model_kind, prepare_model_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FLEETSERVE_CACHE", str(root))
    return root


def make_zip(path, members: dict[str, str]):
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


def test_a_good_zip_is_unpacked_once(tmp_path, cache, monkeypatch):
    source = make_zip(
        tmp_path / "tiny.zip",
        {"config.json": json.dumps({"model_type": "bert"}), "1_Pooling/config.json": "{}", "modules.json": "[]"},
    )
    folder = prepare_model_dir(str(source), progress=False)
    assert folder.parent == cache / "models" and folder.name.startswith("tiny-")
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "bert"}
    assert (folder / "1_Pooling" / "config.json").read_text() == "{}"
    assert [p.name for p in (cache / "models").iterdir()] == [folder.name]  # no temporary folder left

    def unpack_again(*args, **kwargs):
        raise AssertionError("the zip was unpacked again")

    monkeypatch.setattr(catalog, "unpack_zip", unpack_again)
    assert prepare_model_dir(str(source), progress=False) == folder


@pytest.mark.parametrize("member", ["../evil", "sub/../../evil", "/abs/evil", "..\\evil", "C:/evil"])
def test_a_member_outside_the_folder_is_refused(tmp_path, cache, member):
    source = make_zip(tmp_path / "bad.zip", {"config.json": "{}", member: "boom"})
    with pytest.raises(UnsupportedModelError, match="outside the model folder"):
        prepare_model_dir(str(source), progress=False)
    assert not (tmp_path / "evil").exists() and not (cache.parent / "evil").exists()
    assert not (cache / "models").exists() or list((cache / "models").iterdir()) == []


def test_a_zip_without_config_is_refused(tmp_path, cache):
    source = make_zip(tmp_path / "empty.zip", {"readme.txt": "hi"})
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        prepare_model_dir(str(source), progress=False)


@pytest.mark.parametrize(
    ("files", "kind"),
    [
        ({"config.json": {"architectures": ["BertModel"]}}, "embed"),
        ({"config.json": {"architectures": ["BertForMaskedLM"]}}, "embed"),
        ({"config.json": {"model_type": "bert"}}, "embed"),
        ({"config.json": {"architectures": ["XLMRobertaModel"]}, "modules.json": []}, "embed"),
        ({"config.json": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}}, "generate"),
    ],
)
def test_model_kind(tmp_path, files, kind):
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    assert model_kind(tmp_path) == kind
