"""Bundles: built from experts and task data, validated on load, refusing experts of another base model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from loramix.bundle import Bundle, resolve_bundle
from loramix.bundle_build import build_bundle
from loramix.errors import LoramixError
from loramix.generation import MixtureModel
from loramix.tasks import get_task


def test_built_bundle_layout(tiny_bundle, tiny_experts):
    manifest = json.loads((tiny_bundle / "bundle.json").read_text())
    assert [e["name"] for e in manifest["experts"]] == ["gsm8k", "arc", "codealpaca"]
    assert [e["task"] for e in manifest["experts"]] == ["gsm8k", "arc", "codealpaca"]
    for entry in manifest["experts"]:
        assert (tiny_bundle / entry["path"] / "adapter_model.safetensors").is_file()
    assert manifest["embedder"] == "minilm" and manifest["router"] == "router.safetensors"
    centroids = load_file(str(tiny_bundle / "router.safetensors"))["centroids"]
    assert centroids.dtype == torch.float32 and centroids.shape == (3, 384)


def test_centroid_rows_are_the_mean_embedding_of_each_task_in_bundle_order(tiny_bundle, tiny_data, embedder):
    centroids = Bundle.load(tiny_bundle).load_centroids()
    for row, task in enumerate(["gsm8k", "arc", "codealpaca"]):
        texts = [e.training_text for e in get_task(task).load(tiny_data, "train")]
        assert torch.allclose(centroids[row], embedder.embed(texts).mean(dim=0), atol=1e-5)


def test_experts_from_another_base_model_are_refused(tiny_base, tiny_experts, tiny_data, tmp_path):
    impostor = tmp_path / "gsm8k"
    shutil.copytree(tiny_experts[0], impostor)
    metadata = json.loads((impostor / "loramix_expert.json").read_text())
    metadata |= {"base_model": "llama-2-7b", "base_model_signature": "0123456789abcdef"}
    (impostor / "loramix_expert.json").write_text(json.dumps(metadata))
    with pytest.raises(LoramixError, match="was trained on base model 'llama-2-7b'"):
        build_bundle(tmp_path / "bundle", {"gsm8k": impostor}, base_model=str(tiny_base), data=tiny_data)


def test_expert_without_a_task_needs_a_task_name(tiny_base, tiny_experts, tiny_data, tmp_path):
    anonymous = tmp_path / "anon"
    shutil.copytree(tiny_experts[0], anonymous)
    (anonymous / "loramix_expert.json").unlink()
    with pytest.raises(LoramixError, match="has no texts for the router"):
        build_bundle(tmp_path / "b1", {"mystery": anonymous}, base_model=str(tiny_base), data=tiny_data)
    bundle = build_bundle(tmp_path / "b2", {"squad": anonymous}, base_model=str(tiny_base), data=tiny_data)
    assert bundle.experts[0].task == "squad"


def test_bundle_from_the_experts_folder(tiny_base, tiny_experts, tiny_data, tmp_path):
    root = tmp_path / "bundle"
    for path in tiny_experts[:2]:
        shutil.copytree(path, root / "experts" / path.name)
    bundle = build_bundle(root, base_model=str(tiny_base), data=tiny_data)
    assert bundle.expert_names == ["arc", "gsm8k"]  # sorted folder order
    with pytest.raises(LoramixError, match="holds none"):
        build_bundle(tmp_path / "empty", base_model=str(tiny_base), data=tiny_data)


def test_corrupt_or_incomplete_bundles(tiny_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "router.safetensors").write_bytes(b"garbage")
    with pytest.raises(LoramixError, match="Router file .* corrupt"):
        MixtureModel.from_bundle(broken)
    (broken / "bundle.json").write_text("{")
    with pytest.raises(LoramixError, match="corrupt"):
        Bundle.load(broken)
    with pytest.raises(LoramixError, match="not a bundle"):
        Bundle.load(tmp_path)


def test_router_with_the_wrong_number_of_rows_is_refused(tiny_bundle, tmp_path):
    from loramix.centroids import save_centroids

    odd = tmp_path / "odd"
    shutil.copytree(tiny_bundle, odd)
    save_centroids(odd / "router.safetensors", torch.randn(2, 384), ["a", "b"], embedder="minilm")
    with pytest.raises(LoramixError, match="lists 3 experts"):
        Bundle.load(odd).load_centroids()


def test_no_default_bundle_says_what_to_do(monkeypatch):
    import loramix.bundle as bundle_module

    monkeypatch.setattr(bundle_module, "default_bundle_path", lambda: None)
    with pytest.raises(LoramixError, match="loramix demo"):
        resolve_bundle(None)
