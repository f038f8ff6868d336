"""DiT weights in other layouts: diffusers' `DiTTransformer2DModel` and facebookresearch/DiT.

The three are the same network (adaLN-Zero blocks, fused-QKV self-attention, tanh-GELU MLP, fixed
sin-cos positions); they differ in names and in where things are stored:

| ditforge                 | facebookresearch/DiT          | diffusers DiTTransformer2DModel                        |
|--------------------------|-------------------------------|--------------------------------------------------------|
| patch_embed (Linear)     | x_embedder.proj (Conv2d)      | pos_embed.proj (Conv2d)                                |
| t_embed.mlp.0 / .2       | t_embedder.mlp.0 / .2         | transformer_blocks.i.norm1.emb.timestep_embedder.linear_1 / _2, one copy per block |
| y_embed (C+1 rows)       | y_embedder.embedding_table    | ...norm1.emb.class_embedder.embedding_table, 1001 rows: DiTPipeline's null class is 1000 |
| blocks.i.attn.qkv        | blocks.i.attn.qkv             | transformer_blocks.i.attn1.to_q / to_k / to_v (split)  |
| blocks.i.attn.proj       | blocks.i.attn.proj            | transformer_blocks.i.attn1.to_out.0                    |
| blocks.i.mlp.0 / .2      | blocks.i.mlp.fc1 / fc2        | transformer_blocks.i.ff.net.0.proj / ff.net.2          |
| blocks.i.ada.1           | blocks.i.adaLN_modulation.1   | transformer_blocks.i.norm1.linear                      |
| final.ada.1 / .linear    | final_layer.adaLN_modulation.1 / .linear | proj_out_1 / proj_out_2                     |

Where they compute differently: diffusers' timestep embedding divides the frequency exponent by
half - 1 (`downscale_freq_shift=1`), DiT's by half (`DiTConfig.t_freq_shift`); DiT's released
checkpoints learn Σ (2C output channels: the ε half is kept, DDPM sampling here uses fixed
variances). Shape problems raise `PretrainedError`: one line naming the first differing tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .dit import DiT, DiTConfig

if TYPE_CHECKING:
    from ..spec import JobSpec

DIFFUSERS_NULL_CLASS = 1000  # DiTPipeline.__call__ builds its unconditional batch from class 1000


class PretrainedError(Exception):
    """Weights that do not fit: one user-facing line."""


def _unsupported(cfg: DiTConfig) -> str | None:
    if cfg.text != "none":
        return "caption conditioning (DiTTransformer2DModel is class-conditional only)"
    if cfg.num_classes <= 0:
        return "an unconditional model (DiTTransformer2DModel needs class labels)"
    if cfg.num_classes > DIFFUSERS_NULL_CLASS:
        return f"{cfg.num_classes} classes (DiTPipeline's null class is {DIFFUSERS_NULL_CLASS})"
    if cfg.mixer_depth or cfg.pos_embed != "sincos" or cfg.patch_t != 1 or cfg.video_attention != "full":
        return "patch-mixer blocks, RoPE or video patches (no DiTTransformer2DModel counterpart)"
    if cfg.pos_layout != "dit":
        return "the pre-export position layout (retrain, or resume into a new run, with this version)"
    return None


# ------------------------------------------------------------------------------ diffusers


def diffusers_config(cfg: DiTConfig, sample_size: int) -> dict:
    return dict(
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.hidden // cfg.heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        num_layers=cfg.depth,
        sample_size=sample_size,
        patch_size=cfg.patch,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=DIFFUSERS_NULL_CLASS,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        attention_bias=True,
    )


def to_diffusers(sd: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """ditforge state dict → DiTTransformer2DModel state dict (the embedders copied into every block)."""
    why = _unsupported(cfg)
    if why:
        raise PretrainedError(f"cannot export to diffusers: {why}")
    D, C, p = cfg.hidden, cfg.in_channels, cfg.patch
    y = sd["y_embed.weight"]  # (num_classes + 1, D), the null class last
    table = y[-1:].repeat(DIFFUSERS_NULL_CLASS + 1, 1)  # unused ids answer with the null class
    table[: cfg.num_classes] = y[: cfg.num_classes]
    out = {
        "pos_embed.proj.weight": sd["patch_embed.weight"].reshape(D, C, p, p),
        "pos_embed.proj.bias": sd["patch_embed.bias"],
        "proj_out_1.weight": sd["final.ada.1.weight"],
        "proj_out_1.bias": sd["final.ada.1.bias"],
        "proj_out_2.weight": sd["final.linear.weight"],
        "proj_out_2.bias": sd["final.linear.bias"],
    }
    for i in range(cfg.depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = d + "norm1.emb."
        for j, lin in ((0, "linear_1"), (2, "linear_2")):
            for w in ("weight", "bias"):
                out[f"{emb}timestep_embedder.{lin}.{w}"] = sd[f"t_embed.mlp.{j}.{w}"]
        out[emb + "class_embedder.embedding_table.weight"] = table
        for w in ("weight", "bias"):
            out[f"{d}norm1.linear.{w}"] = sd[f"{b}ada.1.{w}"]
            q, k, v = sd[f"{b}attn.qkv.{w}"].chunk(3, dim=0)  # fused rows are [q; k; v]
            out[f"{d}attn1.to_q.{w}"], out[f"{d}attn1.to_k.{w}"], out[f"{d}attn1.to_v.{w}"] = q, k, v
            out[f"{d}attn1.to_out.0.{w}"] = sd[f"{b}attn.proj.{w}"]
            out[f"{d}ff.net.0.proj.{w}"] = sd[f"{b}mlp.0.{w}"]
            out[f"{d}ff.net.2.{w}"] = sd[f"{b}mlp.2.{w}"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def from_diffusers(sd: dict[str, torch.Tensor], config: dict, num_classes: int, where: str) -> dict[str, torch.Tensor]:
    """DiTTransformer2DModel state dict → ditforge layout (shapes are checked by `load_into`)."""
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise PretrainedError(
            f"{where}: norm_type {config.get('norm_type')!r}: only ada_norm_zero DiTs map to ditforge"
        )
    depth = config["num_layers"]
    w = sd["pos_embed.proj.weight"]  # (D, C, p, p)
    out = {
        "patch_embed.weight": w.reshape(w.shape[0], -1),
        "patch_embed.bias": sd["pos_embed.proj.bias"],
        "final.ada.1.weight": sd["proj_out_1.weight"],
        "final.ada.1.bias": sd["proj_out_1.bias"],
        "final.linear.weight": sd["proj_out_2.weight"],
        "final.linear.bias": sd["proj_out_2.bias"],
    }
    emb0 = "transformer_blocks.0.norm1.emb."
    for i in range(1, depth):  # ditforge shares one embedder; diffusers keeps a copy per block
        for k in [k for k in sd if k.startswith(emb0)]:
            other = k.replace("transformer_blocks.0.", f"transformer_blocks.{i}.", 1)
            if other in sd and not torch.equal(sd[k], sd[other]):
                raise PretrainedError(
                    f"{where}: {other} differs from block 0's copy (ditforge shares one timestep/class "
                    "embedder across blocks, as DiT does)"
                )
    for j, lin in ((0, "linear_1"), (2, "linear_2")):
        for x in ("weight", "bias"):
            out[f"t_embed.mlp.{j}.{x}"] = sd[f"{emb0}timestep_embedder.{lin}.{x}"]
    key = emb0 + "class_embedder.embedding_table.weight"
    table = sd[key]
    n = config.get("num_embeds_ada_norm") or table.shape[0] - 1
    if table.shape[0] != n + 1 or num_classes > n:
        raise PretrainedError(
            f"{where}: {key} has shape {tuple(table.shape)}; the spec's model.num_classes "
            f"{num_classes} needs at least {num_classes + 1} rows with the null class last"
        )
    if num_classes < n and not torch.equal(table[num_classes:n], table[n:].expand(n - num_classes, -1)):
        raise PretrainedError(
            f"{where}: {key} holds {n} trained classes; the spec's model.num_classes is {num_classes}"
        )
    out["y_embed.weight"] = torch.cat([table[:num_classes], table[n:]])
    for i in range(depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        for x in ("weight", "bias"):
            out[f"{b}ada.1.{x}"] = sd[f"{d}norm1.linear.{x}"]
            out[f"{b}attn.qkv.{x}"] = torch.cat([sd[f"{d}attn1.to_{c}.{x}"] for c in "qkv"])
            out[f"{b}attn.proj.{x}"] = sd[f"{d}attn1.to_out.0.{x}"]
            out[f"{b}mlp.0.{x}"] = sd[f"{d}ff.net.0.proj.{x}"]
            out[f"{b}mlp.2.{x}"] = sd[f"{d}ff.net.2.{x}"]
    return out


def read_diffusers_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A `save_pretrained` folder of a DiTTransformer2DModel (or a pipeline folder holding `transformer/`)."""
    from safetensors.torch import load_file

    if (path / "transformer" / "config.json").exists():
        path = path / "transformer"
    cfg_file = path / "config.json"
    weights = sorted(path.glob("*.safetensors"))
    if not cfg_file.exists() or not weights:
        raise PretrainedError(
            f"{path}: not a diffusers model folder (needs config.json and *.safetensors; "
            ".bin weights are refused: they are pickles)"
        )
    config = json.loads(cfg_file.read_text())
    sd: dict[str, torch.Tensor] = {}
    for f in weights:  # safetensors: reading weights never runs code
        sd.update(load_file(str(f)))
    return sd, config


# ------------------------------------------------------------------------------ facebookresearch/DiT


def from_dit(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """facebookresearch/DiT `models.py` state dict → ditforge layout."""
    rename = {
        "t_embedder.mlp.": "t_embed.mlp.",
        "y_embedder.embedding_table.": "y_embed.",
        "final_layer.adaLN_modulation.": "final.ada.",
        "final_layer.linear.": "final.linear.",
    }
    out = {}
    for k, v in sd.items():
        if k == "pos_embed":  # fixed sin-cos table (a frozen parameter there): computed here
            continue
        if k.startswith("x_embedder.proj."):
            out["patch_embed." + k.rsplit(".", 1)[1]] = v.reshape(v.shape[0], -1) if v.dim() == 4 else v
            continue
        for a, b in rename.items():
            if k.startswith(a):
                out[b + k[len(a) :]] = v
                break
        else:
            if k.startswith("blocks."):
                k = (
                    k.replace(".mlp.fc1.", ".mlp.0.")
                    .replace(".mlp.fc2.", ".mlp.2.")
                    .replace(".adaLN_modulation.", ".ada.")
                )
            out[k] = v
    # learn_sigma=True (every released DiT): the output has [ε, Σ] channels per patch pixel; keep ε.
    w, lin = out.get("patch_embed.weight"), out.get("final.linear.weight")
    if w is not None and lin is not None:
        D = lin.shape[1]
        C = sd["x_embedder.proj.weight"].shape[1] if "x_embedder.proj.weight" in sd else None
        if C and lin.shape[0] == 2 * (w.shape[1]):  # out = p·p·2C, patch_embed in = C·p·p
            pp = w.shape[1] // C
            out["final.linear.weight"] = lin.view(pp, 2 * C, D)[:, :C].reshape(pp * C, D)
            out["final.linear.bias"] = out["final.linear.bias"].view(pp, 2 * C)[:, :C].reshape(-1)
    return out


def read_dit_pt(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as e:
        raise PretrainedError(
            f"{path}: cannot be read with torch.load(weights_only=True) "
            f"({' '.join(str(e).split())[:200]}); save the state dict alone, e.g. "
            "torch.save(ckpt['ema'], 'dit.pt')"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):  # a DiT train.py checkpoint
        obj = obj["ema"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(f"{path}: not a state dict of tensors")
    return obj


# ------------------------------------------------------------------------------ loading


def read_pretrained(path: str, num_classes: int) -> dict[str, torch.Tensor]:
    """`model.init_from` → a ditforge-layout state dict (not yet checked against a model)."""
    p = Path(path.removeprefix("file://")).expanduser()
    if not p.exists():
        raise PretrainedError(f"model.init_from: {path}: no such file or folder")
    if p.is_dir():
        sd, config = read_diffusers_folder(p)
        return from_diffusers(sd, config, num_classes, str(p))
    return from_dit(read_dit_pt(p), str(p))


def check_shapes(model: DiT, sd: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor the model has must come with the same shape, and nothing may be left over."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            raise PretrainedError(f"{where}: no tensor for {k} {tuple(v.shape)} (the spec's model has it)")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise PretrainedError(
                f"{where}: {k} has shape {tuple(sd[k].shape)}, the spec's model expects {tuple(v.shape)}"
            )
    extra = sorted(set(sd) - set(own))
    if extra:
        raise PretrainedError(f"{where}: {extra[0]} {tuple(sd[extra[0]].shape)} has no place in the spec's model")


def load_into(model: DiT, path: str) -> None:
    sd = read_pretrained(path, model.cfg.num_classes)
    check_shapes(model, sd, path)
    model.load_state_dict(sd)


def check_spec(spec: JobSpec, in_channels: int) -> None:
    """Before anything starts: the weights fit the spec's model (built on the meta device)."""
    from .dit import dit_config

    assert spec.model.init_from is not None  # the caller checks there is something to load
    with torch.device("meta"):
        model = DiT(dit_config(spec.model, in_channels))
    check_shapes(model, read_pretrained(spec.model.init_from, spec.model.num_classes), spec.model.init_from)
