"""Frozen text encoders: captions -> the UNet's cross-attention context c.

    FrozenCLIPEmbedder      SD 1.x   OpenAI CLIP ViT-L/14 text tower (transformers)   c: [B, 77, 768]
    FrozenOpenCLIPEmbedder  SD 2.x   OpenCLIP ViT-H/14 text tower (open_clip)         c: [B, 77, 1024]

Long prompts: `max_length` 150 or 225 (75 x k tokens) gives c: [B, 77 x k, D], each
77-position chunk of the ids (tokenizer.py) encoded on its own, at positions 0..76, and the
k results concatenated along the sequence, as AUTOMATIC1111 does. (kohya's sd-scripts then
drop the inner BOS/EOS positions, [B, 75 x k + 2, D]; the UNet takes either length.)

Both are built with random (or meta-device) weights and filled from a checkpoint
later; nothing is downloaded. Their state-dict names are those of the released
checkpoints under `cond_stage_model.`:

    transformer.text_model.embeddings.token_embedding.weight, ...   (SD 1.x)
    model.transformer.resblocks.0.attn.in_proj_weight, ...          (SD 2.x)
"""
from __future__ import annotations

import math

import open_clip
import torch
from open_clip.model import _build_text_tower
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders.tokenizer import (BOS_ID, CHUNK_TOKENS, CONTEXT_LENGTH, EOS_ID, chunk_count,
                                            tokenize_sd1, tokenize_sd2)


class AbstractEncoder(nn.Module):
    """A text encoder: `tokenize` on the CPU, `encode_tokens` on the module's device."""

    max_length = CONTEXT_LENGTH

    def tokenize(self, texts: list[str]) -> torch.LongTensor:
        raise NotImplementedError

    def encode_tokens(self, tokens: torch.LongTensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, D]. L up to the model's 77 positions is one sequence; a long
        prompt's [B, 77 x k] ids are k chunks, each encoded on its own, then concatenated."""
        batch, length = tokens.shape
        if length <= CONTEXT_LENGTH:
            return self.encode_sequence(tokens)
        if length % CONTEXT_LENGTH:
            raise ValueError(f"{type(self).__name__}: {length} token ids are neither one sequence of at most "
                             f"{CONTEXT_LENGTH} nor whole chunks of {CONTEXT_LENGTH}")
        h = self.encode_sequence(tokens.reshape(-1, CONTEXT_LENGTH))  # [B x k, 77, D]
        return h.reshape(batch, length, h.shape[-1])

    def encode_sequence(self, tokens: torch.LongTensor) -> torch.Tensor:
        """[B, L <= 77] ids -> [B, L, D]."""
        raise NotImplementedError

    @property
    def max_token_length(self) -> int | None:
        """kohya's `--max_token_length` (`ss_max_token_length`): 150 or 225 for a long prompt,
        None for the usual 75 tokens."""
        return None if chunk_count(self.max_length) == 1 else self.max_length

    @property
    def context_length(self) -> int:
        """Positions of c: max_length, or 77 x k for a long prompt of 75 x k tokens."""
        chunks = chunk_count(self.max_length)
        return self.max_length if chunks == 1 else chunks * CONTEXT_LENGTH

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(texts).to(self.device))

    def blocks(self) -> list[nn.Module]:
        """The repeated transformer layers (what regional compilation compiles)."""
        raise NotImplementedError

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self(texts)

    def freeze(self) -> None:
        self.eval()
        for param in self.parameters():
            param.requires_grad_(False)


def _check_max_length(name: str, max_length: int, positions: int) -> None:
    if isinstance(max_length, int) and max_length > positions == CONTEXT_LENGTH and max_length % CHUNK_TOKENS == 0:
        return  # a long prompt: chunks of 77 positions
    if not isinstance(max_length, int) or not 2 <= max_length <= positions:
        raise ValueError(f"{name}: max_length must be an integer in [2, {positions}] (the model's positions), "
                         f"or 150, 225, ... (a long prompt in chunks of {CHUNK_TOKENS} tokens), got {max_length!r}")


class FrozenCLIPEmbedder(AbstractEncoder):
    """SD 1.x text encoder: CLIP ViT-L/14's text transformer.

    Output: the hidden state `clip_skip` layers from the end (1 = last layer), through
    the final layer norm. layer="penultimate" is a name for clip_skip=2.
    The size arguments exist for small test models; the defaults are ViT-L/14's.
    """

    POSITIONS = 77
    POSITION_IDS_KEY = "transformer.text_model.embeddings.position_ids"

    def __init__(self, max_length: int = CONTEXT_LENGTH, freeze: bool = True, layer: str = "last",
                 clip_skip: int = 1, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 intermediate_size: int = 3072):
        super().__init__()
        name = type(self).__name__
        if layer not in ("last", "penultimate"):
            raise ValueError(f"{name}: layer must be 'last' or 'penultimate', got {layer!r}")
        if layer == "penultimate" and clip_skip != 1:
            raise ValueError(f"{name}: layer='penultimate' already means clip_skip=2; "
                             f"set layer='last' with clip_skip={clip_skip!r} instead")
        if not isinstance(clip_skip, int) or not 1 <= clip_skip <= num_layers:
            raise ValueError(f"{name}: clip_skip must be an integer in [1, num_layers={num_layers}], "
                             f"got {clip_skip!r}")
        if hidden_size % num_heads:
            raise ValueError(f"{name}: hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        _check_max_length(name, max_length, self.POSITIONS)
        self.max_length = max_length
        self.clip_skip = 2 if layer == "penultimate" else clip_skip

        config = CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=self.POSITIONS,
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            intermediate_size=intermediate_size, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            attention_dropout=0.0, dropout=0.0,
            pad_token_id=1, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        )
        # The released files nest the model one level deeper than transformers 5 does.
        self.transformer = nn.Module()
        self.transformer.text_model = CLIPTextModel(config)
        # Released files carry position_ids, so it is saved; its values are never read:
        # encode_sequence passes arange positions, and loading replaces whatever a file holds
        # (some merged checkpoints hold damaged values, newer conversions none at all).
        self.transformer.text_model.embeddings.register_buffer(
            "position_ids", torch.arange(self.POSITIONS).unsqueeze(0), persistent=True)
        self.register_load_state_dict_pre_hook(self._load_clean_position_ids)
        if freeze:
            self.freeze()

    def _load_clean_position_ids(self, module, state_dict, prefix, *args) -> None:
        state_dict[prefix + self.POSITION_IDS_KEY] = torch.arange(self.POSITIONS).unsqueeze(0)

    def tokenize(self, texts: list[str]) -> torch.LongTensor:
        return tokenize_sd1(texts, self.max_length)

    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.text_model.encoder.layers)

    def encode_sequence(self, tokens: torch.LongTensor) -> torch.Tensor:
        """[B, L <= 77] ids -> [B, L, hidden_size]."""
        text_model = self.transformer.text_model
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        out = text_model(input_ids=tokens, position_ids=positions, output_hidden_states=True)
        # out.hidden_states = (embeddings, layer 1, ..., layer N), before the final norm
        h = out.hidden_states[-self.clip_skip]
        return text_model.final_layer_norm(h)


class FrozenOpenCLIPEmbedder(AbstractEncoder):
    """SD 2.x text encoder: an open_clip text tower (ViT-H-14 for SD 2.x).

    Only the text tower is built; `logit_scale` is kept because the released files
    have it. layer="penultimate" (SD 2.x) runs all residual blocks but the last, then
    ln_final; layer="last" runs them all.
    """

    LAYERS = {"last": 0, "penultimate": 1}  # blocks skipped at the end

    def __init__(self, arch: str = "ViT-H-14", freeze: bool = True, layer: str = "penultimate",
                 max_length: int = CONTEXT_LENGTH):
        super().__init__()
        name = type(self).__name__
        if layer not in self.LAYERS:
            raise ValueError(f"{name}: layer must be one of {sorted(self.LAYERS)}, got {layer!r}")
        if arch not in open_clip.list_models():
            raise ValueError(f"{name}: arch {arch!r} is not an open_clip architecture "
                             f"(see open_clip.list_models(), e.g. 'ViT-H-14')")
        model_cfg = open_clip.get_model_config(arch)
        text_cfg = model_cfg["text_cfg"]
        if text_cfg.get("hf_model_name"):
            raise ValueError(f"{name}: arch {arch!r} uses a Hugging Face text model "
                             f"({text_cfg['hf_model_name']}), which cannot be built offline")
        _check_max_length(name, max_length, text_cfg.get("context_length", CONTEXT_LENGTH))
        self.max_length = max_length
        self.layer_idx = self.LAYERS[layer]

        self.model = _build_text_tower(model_cfg["embed_dim"], text_cfg,
                                       quick_gelu=model_cfg.get("quick_gelu", False))
        self.model.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # The causal mask is built per call: a non-persistent buffer is not in checkpoints
        # and would hold garbage after building on the meta device and loading.
        self.model.attn_mask = None
        if freeze:
            self.freeze()

    def tokenize(self, texts: list[str]) -> torch.LongTensor:
        return tokenize_sd2(texts, self.max_length)

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer.resblocks)

    def encode_sequence(self, tokens: torch.LongTensor) -> torch.Tensor:
        """[B, L <= 77] ids -> [B, L, width]."""
        m = self.model
        L = tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:L]  # [B, L, D]
        causal = torch.full((L, L), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        blocks = m.transformer.resblocks
        for block in blocks[: len(blocks) - self.layer_idx]:
            x = block(x, attn_mask=causal)
        return m.ln_final(x)
