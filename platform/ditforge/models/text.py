"""A frozen `transformers` text encoder read from a local folder (no download), for real captions.

The generated sets use the DiT's own small trainable caption encoder (`model.text: own`); real
captions use a pretrained one (T5, CLIP text, any `AutoModel` with a last hidden state). It stays
outside DeepSpeed: it is frozen, so there is nothing to shard or optimise, and ZeRO-3 would only
add gathers to every forward.
"""

from __future__ import annotations

import torch


class TextEncoder:
    def __init__(
        self, path: str, max_length: int = 64, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ):
        from transformers import AutoModel, AutoTokenizer

        path = path.removeprefix("file://")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)  # never a pickle
        # Encoder-decoder checkpoints (T5): only the encoder reads captions.
        self.model = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model
        self.model = self.model.to(device, dtype).eval().requires_grad_(False)
        self.max_length, self.device = max_length, device
        self.dim = int(getattr(model.config, "d_model", None) or model.config.hidden_size)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """captions → (B, max_length, dim). Padded to a fixed length and used unmasked, as SD3 does
        with T5, so every batch has one shape and the attention kernels need no mask."""
        tok = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
