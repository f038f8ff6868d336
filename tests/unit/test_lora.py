"""LoRA (models/lora.py) without a training loop: which layers a target selects, the spec's checks,
the merge W + s·B A, and the adapter files peft (and, with diffusers' names, a DiTTransformer2DModel)
load back. The training loop's side (adapter-only checkpoints, exact resume, export): tests/e2e/test_lora.py."""

from __future__ import annotations

import json

import pytest
import torch

from ditforge.models import lora
from ditforge.models.dit import DiT, dit_config
from ditforge.spec import JobSpec, LoraSpec, ModelSpec

CFG = dit_config(ModelSpec(size="T", patch=2, num_classes=10), 4)
TARGETS = ["blocks.*.attn.qkv", "attn.proj", "blocks.*.mlp.0", "blocks.*.mlp.2", "blocks.*.ada.1", "final.linear"]


def _adapted(spec: LoraSpec, seed: int = 0) -> tuple[DiT, dict[str, torch.Tensor], list[str]]:
    """A base DiT, the same with adapters whose B is random (B starts at zero: nothing to see)."""
    torch.manual_seed(seed)
    base = DiT(CFG)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.02)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    model = DiT(CFG)
    model.load_state_dict(base_sd)
    names = lora.apply(model, spec)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    return model.eval(), base_sd, names


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.3, 0.7]), torch.tensor([1, 2])


def test_targets_are_names_or_suffixes_with_stars_and_select_linear_layers_only():
    model = DiT(CFG)
    depth = CFG.depth
    assert lora.resolve_targets(model, ["blocks.*.attn.qkv"]) == [f"blocks.{i}.attn.qkv" for i in range(depth)]
    assert lora.resolve_targets(model, ["attn.qkv"]) == [f"blocks.{i}.attn.qkv" for i in range(depth)]
    # a bare suffix selects every layer that ends so, the timestep embedder's mlp.0 too
    assert "t_embed.mlp.0" in lora.resolve_targets(model, ["mlp.0"])
    assert lora.resolve_targets(model, ["final.linear"]) == ["final.linear"]
    with pytest.raises(lora.LoraError, match=r"train.lora.targets: 'attn.qvk' matches no layer of the model \(linear"):
        lora.resolve_targets(model, ["attn.qvk"])
    with pytest.raises(lora.LoraError, match=r"'y_embed' selects y_embed \(Embedding\), not a linear layer"):
        lora.resolve_targets(model, ["y_embed"])


def test_only_the_adapters_train_and_they_start_as_the_base():
    torch.manual_seed(0)
    base = DiT(CFG)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.02)
    model = DiT(CFG)
    model.load_state_dict(base.state_dict())
    names = lora.apply(model, LoraSpec(rank=4))
    assert len(names) == 4 * CFG.depth  # the default targets: qkv, proj, mlp.0, mlp.2 of every block
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # A (4, in) and B (out, 4) per layer
    assert lora.trainable(model) == sum(4 * (m.in_features + m.out_features) for m in _linears(base, names))
    with torch.no_grad():  # B = 0: the adapted model is the imported one at step 0
        torch.testing.assert_close(model.eval()(*_inputs()), base.eval()(*_inputs()), atol=0, rtol=0)


def _linears(model: DiT, names: list[str]) -> list[torch.nn.Linear]:
    mods = dict(model.named_modules())
    return [mods[n] for n in names]


def test_merge_is_base_plus_scaled_BA_and_computes_what_the_adapters_do():
    spec = LoraSpec(rank=4, alpha=8, targets=TARGETS)
    model, base_sd, names = _adapted(spec)
    adapters = lora.adapter_tensors(model.state_dict())
    assert len(lora.layers(adapters)) == len(names)
    merged = lora.merge(base_sd, adapters, spec.scale)
    assert set(merged) == set(base_sd)
    name = "blocks.1.attn.qkv"
    A, B = adapters[name + lora.A_SUFFIX], adapters[name + lora.B_SUFFIX]
    torch.testing.assert_close(merged[f"{name}.weight"], base_sd[f"{name}.weight"] + 2.0 * B @ A)
    assert torch.equal(merged["y_embed.weight"], base_sd["y_embed.weight"])
    plain = DiT(CFG)
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(*_inputs()), model(*_inputs()), atol=1e-6, rtol=0)


def test_the_peft_layout_loads_back_with_peft(tmp_path):
    from peft import PeftModel

    spec = LoraSpec(rank=4, alpha=4, targets=TARGETS)
    model, base_sd, names = _adapted(spec)
    adapters = lora.adapter_tensors(model.state_dict())
    lora.write_peft(tmp_path / "adapter", adapters, lora.config(spec, names))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == ("LORA", 4, 4, sorted(names))
    assert lora.read_peft(tmp_path / "adapter").keys() == adapters.keys()
    base = DiT(CFG)
    base.load_state_dict(base_sd)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*_inputs()), model(*_inputs()), atol=1e-6, rtol=0)


def test_the_diffusers_named_adapter_loads_onto_the_exported_transformer(tmp_path):
    """ditforge's fused qkv adapter becomes to_q / to_k / to_v adapters with the shared A; peft
    loads them onto a DiTTransformer2DModel holding the base weights, which then computes what the
    adapted ditforge model computes."""
    from diffusers import DiTTransformer2DModel
    from peft import PeftModel

    from ditforge.models.convert import diffusers_config, to_diffusers

    spec = LoraSpec(rank=4, alpha=8, targets=TARGETS)
    model, base_sd, names = _adapted(spec)
    mapped = lora.to_diffusers(lora.adapter_tensors(model.state_dict()))
    assert isinstance(mapped, dict) and "transformer_blocks.0.attn1.to_k" + lora.A_SUFFIX in mapped
    lora.write_peft(tmp_path / "transformer_lora", mapped, lora.config(spec, names))
    tr = DiTTransformer2DModel(**diffusers_config(CFG, 8))
    tr.load_state_dict(to_diffusers(base_sd, CFG))
    peft_tr = PeftModel.from_pretrained(tr.eval(), str(tmp_path / "transformer_lora")).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = peft_tr(x, timestep=t * 1000, class_labels=y).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # the timestep embedder exists once per block in diffusers: its adapter has no one-to-one place
    shared, _, _ = _adapted(LoraSpec(rank=2, targets=["t_embed.mlp.0"]))
    assert "no one-to-one layer" in str(lora.to_diffusers(lora.adapter_tensors(shared.state_dict())))


def _job(**train) -> dict:
    return {
        "name": "j",
        "data": {"train": "file:///tmp/x"},
        "model": {"init_from": "/tmp/base"},
        "train": {"lora": {"rank": 4}, **train},
    }


def test_the_spec_refuses_what_lora_cannot_do():
    from pydantic import ValidationError

    spec = JobSpec.model_validate(_job())
    assert spec.train.lora is not None and spec.train.lora.scale == 1.0
    assert LoraSpec(rank=4, alpha=16).scale == 4.0
    for change, line in [
        ({"model": {}}, "train.lora: needs model.init_from"),
        ({"deepspeed": {"zero_stage": 3}}, "train.lora: runs under deepspeed.zero_stage 0, 1 or 2"),
        ({"resources": {"workers": 2, "min_workers": 1}, "train": {"lora": {}, "max_failures": 1}}, "elastic"),
    ]:
        with pytest.raises(ValidationError, match=line):
            JobSpec.model_validate(_job() | change)
    with pytest.raises(ValidationError, match="rank"):
        JobSpec.model_validate(_job() | {"train": {"lora": {"rank": 0}}})


def test_a_target_that_selects_nothing_is_one_line_before_anything_starts(tmp_path):
    """`submit` checks the base's shapes (models/convert.py) and then every LoRA target on a
    meta-device model (models/lora.py `check_spec`)."""
    from diffusers import DiTTransformer2DModel

    from ditforge.models.convert import diffusers_config, to_diffusers

    tr = DiTTransformer2DModel(**diffusers_config(CFG, 8))
    tr.load_state_dict(to_diffusers(DiT(CFG).state_dict(), CFG))
    tr.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    job = _job() | {"model": {"init_from": str(tmp_path / "base")}}
    lora.check_spec(JobSpec.model_validate(job), 4)  # the default targets fit
    job["train"] = {"lora": {"rank": 4, "targets": ["blocks.*.attn.qvk"]}}
    with pytest.raises(lora.LoraError) as e:
        lora.check_spec(JobSpec.model_validate(job), 4)
    assert str(e.value).startswith("train.lora.targets: 'blocks.*.attn.qvk' matches no layer of the model")
    assert "\n" not in str(e.value)
