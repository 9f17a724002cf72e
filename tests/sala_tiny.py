"""Tiny random MiniCPM-SALA checkpoints in the exact Hugging Face format, for tests (and benches)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_config(**overrides) -> dict:
    config = {
        "architectures": ["MiniCPMSALAForCausalLM"], "model_type": "minicpm_sala",
        "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "lightning_nh": 4, "lightning_nkv": 4, "lightning_head_dim": 16, "lightning_scale": "1/sqrt(d)",
        "lightning_use_rope": True, "attn_use_rope": False, "qk_norm": True, "use_output_norm": True,
        "use_output_gate": True, "attn_use_output_gate": True, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 16,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": [2],
        "mixer_types": ["minicpm4", "lightning-attn", "lightning-attn", "minicpm4"],
        "sparse_config": {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16,
                          "window_size": 32, "topk": 3, "use_nope": False, "dense_len": 96},
    }
    config.update(overrides)
    return config


def tiny_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    from salachat.engine.models.sala import SalaArgs, SalaForCausalLM

    torch.manual_seed(seed)
    model = SalaForCausalLM(SalaArgs.from_config(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3 if "embed" in name else 0.15)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def write_tiny_checkpoint(folder: Path, config: dict | None = None, seed: int = 0, shards: int = 2,
                          drop: str | None = None, reshape: str | None = None) -> Path:
    """config.json + sharded safetensors + index + a byte-level BPE tokenizer.json with a ChatML template."""
    config = config or tiny_config()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = tiny_state_dict(config, seed)
    if drop:
        tensors.pop(drop)
    if reshape:
        tensors[reshape] = tensors[reshape][:-1].clone()
    names = sorted(tensors)
    weight_map = {}
    for shard in range(shards):
        part = names[shard::shards]
        filename = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / filename))
        weight_map.update({n: filename for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _write_tokenizer(folder, config["vocab_size"])
    return folder


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    alphabet = ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    assert tokenizer.get_vocab_size() <= vocab_size
    tokenizer.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": True, "chat_template": template}))
