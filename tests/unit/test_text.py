"""Caption conditioning through a `transformers` text encoder read from a local folder."""

from __future__ import annotations

import torch


def test_local_transformers_encoder_conditions_the_dit(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    from ditforge.models.dit import DiT, DiTConfig
    from ditforge.models.text import TextEncoder

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "star", "moving", "up"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "enc")
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    ).save_pretrained(tmp_path / "enc")
    enc = TextEncoder(f"file://{tmp_path / 'enc'}", max_length=8)
    emb = enc.encode(["a red circle", "a blue star moving up"])
    assert emb.shape == (2, 8, 32) and enc.dim == 32
    assert not any(p.requires_grad for p in enc.model.parameters())  # frozen
    model = DiT(DiTConfig(in_channels=4, num_classes=0, text="external", text_dim=32))
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2), text=emb)
    (out - 1).square().mean().backward()
    assert model.caption_proj[0].weight.grad is None or model.caption_proj[0].weight.grad.abs().sum() == 0  # zero-init
    assert out.shape == (2, 4, 8, 8)
