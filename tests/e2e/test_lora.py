"""LoRA fine-tuning on the real DiT loop (2 CPU ranks, ZeRO-2, no Ray; see tests/loops.py): an
imported base stays frozen, checkpoints hold the adapters alone, a resume continues exactly, and
the export holds the merged weights (base + s·B A) and the adapter in peft's layout.
(The same job through `ditforge submit`: tests/e2e/test_train_e2e.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditforge import storage
from ditforge.models import lora
from ditforge.runs.folder import MANIFEST, complete_steps, join_step
from ditforge.spec.job import LORA_TARGETS

from ..datasets import make_latents
from ..loops import dit_spec, metric, records, run_loop

pytestmark = pytest.mark.timeout(600)
LATENT = (12, 4, 4)


def write_base(folder: Path, num_classes: int = 10, in_channels: int = 12, sample_size: int = 4) -> dict:
    """A "pretrained" DiT-T/2 as a diffusers DiTTransformer2DModel folder (what `model.init_from`
    imports): every weight drawn small and non-zero, so the adapted layers get gradients (the
    adaLN-Zero init would gate every block off). → its ditforge-layout state dict."""
    from diffusers import DiTTransformer2DModel

    from ditforge.models.convert import diffusers_config, to_diffusers
    from ditforge.models.dit import DiT, dit_config
    from ditforge.spec import ModelSpec

    cfg = dit_config(ModelSpec(size="T", patch=2, num_classes=num_classes), in_channels)
    torch.manual_seed(123)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    tr = DiTTransformer2DModel(**diffusers_config(cfg, sample_size))
    tr.load_state_dict(to_diffusers(sd, cfg))
    tr.save_pretrained(str(folder), safe_serialization=True)
    return sd


def lora_spec(data: str, runs: str, base: Path, **train) -> dict:
    return dit_spec(
        data,
        runs,
        model={"init_from": str(base)},
        train={"steps": 4, "lr": 1e-2, "lora": {"rank": 4, "alpha": 8}, **train},
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    uri = f"file://{root}/latents"
    make_latents(uri, [16, 16, 16, 16], shapes=[LATENT], noise_seed=0)
    base_sd = write_base(root / "base")
    return uri, root, base_sd


@pytest.fixture(scope="module")
def full_run(setup):
    uri, root, _ = setup
    run_uri, out = f"file://{root}/runs/a", root / "a"
    res = run_loop(
        "ditforge.train.worker.train_loop", lora_spec(uri, f"file://{root}/runs", root / "base"), run_uri, out
    )
    assert res == {0: None, 1: None}, res
    return run_uri, out


def test_only_the_adapters_train_and_the_checkpoints_hold_them_alone(setup, full_run):
    _, root, base_sd = setup
    run_uri, out = full_run
    params = {k: v for r in records(out, 0, "params") for k, v in r["params"].items()}
    targets = len(lora.resolve_targets(_dit(), list(LORA_TARGETS)))
    assert params["lora.layers"] == targets and 0 < params["model.trainable_params"] < params["model.params"] / 10
    loss = metric(out, "train/loss")
    assert sorted(loss) == [1, 2, 3, 4] and all(v == v for v in loss.values()), loss
    assert complete_steps(run_uri) == [2, 4]
    step = join_step(run_uri, 4)
    manifest = json.loads(storage.read_bytes(storage.join(step, MANIFEST)))
    assert manifest["adapters_only"] is True
    folder = Path(step.removeprefix("file://"))
    from ditforge.train.checkpoint import safe_torch_load

    module = safe_torch_load(folder / "mp_rank_00_model_states.pt")["module"]
    assert module and all(".lora_A." in k or ".lora_B." in k for k in module), sorted(module)[:5]
    assert set(load_file(str(folder / "ema.safetensors"))) == set(module)  # the EMA averages the adapters only
    full_bytes = sum(v.numel() * 4 for v in base_sd.values())
    assert sum(m["bytes"] for m in manifest["files"].values()) < full_bytes, (
        "a LoRA checkpoint is smaller than the base"
    )


def _dit():
    from ditforge.models.dit import DiT, dit_config
    from ditforge.spec import ModelSpec

    return DiT(dit_config(ModelSpec(size="T", patch=2, num_classes=10), LATENT[0]))


def test_resume_from_the_adapters_continues_exactly(setup, full_run):
    uri, root, _ = setup
    run_uri, out = full_run
    res = run_loop(
        "ditforge.train.worker.train_loop",
        lora_spec(uri, f"file://{root}/runs", root / "base"),
        f"file://{root}/runs/b",
        root / "b",
        resume_from=join_step(run_uri, 2),
    )
    assert res == {0: None, 1: None}, res
    full, part = metric(out, "train/loss"), metric(root / "b", "train/loss")
    assert sorted(part) == [3, 4]
    for s in (3, 4):
        assert part[s] == pytest.approx(full[s], rel=1e-6, abs=1e-7), (s, part[s], full[s])


def test_export_writes_merged_weights_and_the_adapter_that_peft_loads(setup, full_run, tmp_path):
    from peft import PeftModel

    from ditforge.inference.export import export, load_model

    _, root, base_sd = setup
    run_uri, _ = full_run
    cfg = export(run_uri, f"file://{tmp_path}/exp")
    exp = tmp_path / "exp"
    assert cfg["lora"]["adapter_weights"] == "ema" and cfg["lora"]["base"] == str(root / "base")
    adapter = load_file(str(exp / "adapter" / "adapter_model.safetensors"))
    config = json.loads((exp / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    ema = load_file(str(exp / "ema.safetensors"))
    assert set(ema) == set(base_sd)  # a plain DiT's weights: loads without peft
    # merged = base + (alpha / r)·B A for every adapted layer; every other weight is the base's (frozen)
    for name in config["target_modules"]:
        A = adapter[f"base_model.model.{name}.lora_A.weight"]
        B = adapter[f"base_model.model.{name}.lora_B.weight"]
        assert B.abs().max() > 0, name  # it trained
        torch.testing.assert_close(ema[f"{name}.weight"], base_sd[f"{name}.weight"] + 2.0 * B @ A)
    adapted = {f"{n}.weight" for n in config["target_modules"]}
    for k in set(base_sd) - adapted:
        torch.testing.assert_close(ema[k], base_sd[k], rtol=0, atol=0)
    raw = load_file(str(exp / "raw.safetensors"))
    assert not torch.equal(raw[f"{config['target_modules'][0]}.weight"], ema[f"{config['target_modules'][0]}.weight"])
    # peft loads the adapter onto the base and computes what the merged export computes
    merged, _ = load_model(exp)
    base = _dit()
    base.load_state_dict(base_sd)
    peft_model = PeftModel.from_pretrained(base, str(exp / "adapter")).eval()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, *LATENT, generator=g), torch.tensor([0.2, 0.8]), torch.tensor([1, 7])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x, t, y), merged(x, t, y), atol=1e-5, rtol=0)
