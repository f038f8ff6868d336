"""LoRA (`train.lora`): low-rank adapters through peft on a frozen, imported DiT.

Each targeted linear layer W becomes W x + s·B A x with A (r, in), B (out, r) and s = alpha / r;
only A and B train (B starts at zero, so step 0 is the imported model exactly). The DiT stays a
DiT (peft's `inject_adapter_in_model`, not a `PeftModel` wrapper): the training loop, sampling
and DeepSpeed see the same module, with the targeted `nn.Linear`s replaced by peft's
`lora.Linear` (`<name>.base_layer`, `<name>.lora_A.default`, `<name>.lora_B.default`).

Checkpoints hold the adapters only (DeepSpeed's `exclude_frozen_parameters`; the base comes from
`model.init_from` again at resume and export). `ditforge export` writes the merged weights (W + s·B A,
what `load_model`, the pyfunc and diffusers load) and the adapter alone in peft's layout:
  adapter/adapter_model.safetensors   keys base_model.model.<name>.lora_A.weight / .lora_B.weight
  adapter/adapter_config.json         peft's LoraConfig (r, lora_alpha, target_modules)
which `peft.PeftModel.from_pretrained(dit_with_base_weights, "adapter")` loads; `--format diffusers`
adds `transformer_lora/`, the same adapter with diffusers' module names, for the exported
DiTTransformer2DModel (`PeftModel.from_pretrained(pipe.transformer, "transformer_lora")`).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .convert import PretrainedError

if TYPE_CHECKING:
    from ..spec import JobSpec, LoraSpec

ADAPTER = "default"  # peft's adapter name inside the model
A_SUFFIX, B_SUFFIX = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"
PEFT_PREFIX = "base_model.model."  # how a PeftModel's saved adapter names its modules
ADAPTER_DIR = "adapter"
DIFFUSERS_ADAPTER_DIR = "transformer_lora"


class LoraError(PretrainedError):
    """A LoRA setting that does not fit the model: one user-facing line."""


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The full names of the linear layers `targets` select, in the model's order. A target is a
    full name or a suffix of one (`attn.qkv`), with `*` for any part (`blocks.*.mlp.0`); each must
    select at least one `nn.Linear`."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen: set[str] = set()
    for t in targets:
        hit = [n for n in linears if fnmatch.fnmatchcase(n, t) or fnmatch.fnmatchcase(n, "*." + t)]
        if not hit:
            others = [n for n, m in model.named_modules() if n and (fnmatch.fnmatchcase(n, t) or n.endswith("." + t))]
            why = (
                f"selects {others[0]} ({type(dict(model.named_modules())[others[0]]).__name__}), not a linear layer"
                if others
                else "matches no layer of the model"
            )
            raise LoraError(f"train.lora.targets: '{t}' {why} (linear layers: e.g. {', '.join(_examples(linears))})")
        chosen.update(hit)
    return [n for n in linears if n in chosen]


def check_spec(spec: JobSpec, in_channels: int) -> None:
    """Before anything starts (`submit`): every target selects a linear layer of the spec's model
    (built on the meta device), and peft is installed."""
    from .dit import DiT, dit_config

    assert spec.train.lora is not None  # the caller checks there are adapters to train
    with torch.device("meta"):
        model = DiT(dit_config(spec.model, in_channels))
    resolve_targets(model, spec.train.lora.targets)
    try:
        import peft  # noqa: F401
    except ImportError:
        raise LoraError("train.lora needs peft: pip install 'ditforge[lora]'") from None


def _examples(linears: list[str]) -> list[str]:
    """A few of the model's linear layer names, block indices as `*`."""
    seen: list[str] = []
    for n in linears:
        g = ".".join("*" if p.isdigit() and i == 1 else p for i, p in enumerate(n.split(".")))
        if g not in seen:
            seen.append(g)
    return seen[:8]


def peft_config(rank: int, alpha: float, names: list[str]) -> Any:
    from peft import LoraConfig

    # lora_alpha / r is peft's scale (peft types alpha as an int; a float works and is what we may have);
    # no dropout (a resumed step must compute what the original did)
    kwargs: dict[str, Any] = {"r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha}
    return LoraConfig(**kwargs, target_modules=names, lora_dropout=0.0, bias="none")


def config(lora: LoraSpec, names: list[str]) -> dict[str, Any]:
    """What model.json records of the adapters: rank, alpha, scale and the adapted layers."""
    return {"rank": lora.rank, "alpha": lora.scale * lora.rank, "scale": lora.scale, "layers": names}


def apply(model: nn.Module, lora: LoraSpec) -> list[str]:
    """Freeze `model` and inject the adapters (in place; the same on every rank given the same
    torch seed: A is drawn, B is zero). → the adapted layers' names."""
    try:
        from peft import inject_adapter_in_model
    except ImportError:
        raise LoraError("train.lora needs peft: pip install 'ditforge[lora]'") from None
    names = resolve_targets(model, lora.targets)
    model.requires_grad_(False)
    inject_adapter_in_model(peft_config(lora.rank, lora.scale * lora.rank, names), model, adapter_name=ADAPTER)
    for n, p in model.named_parameters():  # peft marks only the adapters trainable; make sure
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    return names


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a state dict (a checkpoint's, the EMA's): `<layer>.lora_A/B.default.weight`."""
    return {k: v for k, v in sd.items() if k.endswith(A_SUFFIX) or k.endswith(B_SUFFIX)}


def layers(adapters: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(A_SUFFIX)] for k in adapters if k.endswith(A_SUFFIX))


def merge(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The plain DiT's state dict with every adapted weight W replaced by W + scale·B A (fp32)."""
    out = {k: v.float().clone() for k, v in base.items()}
    for name in layers(adapters):
        A, B = adapters[name + A_SUFFIX].float(), adapters[name + B_SUFFIX].float()
        key = f"{name}.weight"
        if key not in out:
            raise LoraError(f"adapter for {name}: the base weights have no {key}")
        out[key] = out[key] + scale * (B @ A)
    return out


def write_peft(folder: Path, adapters: dict[str, torch.Tensor], lora_cfg: dict[str, Any]) -> None:
    """The adapter alone in peft's layout (see the module docstring)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = {PEFT_PREFIX + k.replace(f".{ADAPTER}.", "."): v.detach().float().contiguous() for k, v in adapters.items()}
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_config(folder, lora_cfg, layers(adapters))


def read_peft(folder: Path) -> dict[str, torch.Tensor]:
    """An adapter `write_peft` wrote, with the model's own names again (`.lora_A.default.weight`)."""
    from safetensors.torch import load_file

    sd = load_file(str(folder / "adapter_model.safetensors"))
    return {
        k.removeprefix(PEFT_PREFIX)
        .replace(".lora_A.", f".lora_A.{ADAPTER}.")
        .replace(".lora_B.", f".lora_B.{ADAPTER}."): v
        for k, v in sd.items()
    }


def _write_config(folder: Path, lora_cfg: dict[str, Any], names: list[str]) -> None:
    peft_config(lora_cfg["rank"], lora_cfg["alpha"], names).save_pretrained(str(folder))
    # peft writes target_modules as a set (unordered JSON list): sorted, so exports are reproducible
    f = folder / "adapter_config.json"
    d = json.loads(f.read_text())
    d["target_modules"] = sorted(names)
    f.write_text(json.dumps(d, indent=2, sort_keys=True))


# diffusers' DiTTransformer2DModel names (models/convert.py's table) for the layers it has one-to-one.
_DIFFUSERS = {
    "attn.proj": "attn1.to_out.0",
    "mlp.0": "ff.net.0.proj",
    "mlp.2": "ff.net.2",
    "ada.1": "norm1.linear",
}
_DIFFUSERS_FINAL = {"final.ada.1": "proj_out_1", "final.linear": "proj_out_2"}


def to_diffusers(adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | str:
    """The adapters with DiTTransformer2DModel's module names (still `.lora_A/B.default.weight`),
    or why they have none: ditforge's fused qkv becomes to_q / to_k / to_v, each with the shared A
    and its third of B's rows (B_q A x is exactly the q rows of B A x)."""
    out: dict[str, torch.Tensor] = {}
    for name in layers(adapters):
        A, B = adapters[name + A_SUFFIX], adapters[name + B_SUFFIX]
        parts = name.split(".")
        if name in _DIFFUSERS_FINAL:
            targets = {_DIFFUSERS_FINAL[name]: B}
        elif parts[0] == "blocks" and ".".join(parts[2:]) == "attn.qkv":
            q, k, v = B.chunk(3, dim=0)
            d = f"transformer_blocks.{parts[1]}.attn1."
            targets = {d + "to_q": q, d + "to_k": k, d + "to_v": v}
        elif parts[0] == "blocks" and ".".join(parts[2:]) in _DIFFUSERS:
            targets = {f"transformer_blocks.{parts[1]}.{_DIFFUSERS['.'.join(parts[2:])]}": B}
        else:
            return f"{name} has no one-to-one layer in diffusers' DiTTransformer2DModel"
        for t, b in targets.items():
            out[t + A_SUFFIX], out[t + B_SUFFIX] = A.clone(), b.clone()
    return out
