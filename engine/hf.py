"""Read a Hugging Face checkpoint folder: config.json, (sharded) safetensors, tokenizer files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    pass


@dataclass
class HFCheckpoint:
    folder: Path
    config: dict
    weight_files: list[Path]

    def load_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for path in self.weight_files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        tensors[name] = f.get_tensor(name)
            except Exception as e:  # safetensors raises its own error types on a damaged header
                raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
        return tensors


def read_hf_folder(path: str | Path) -> HFCheckpoint:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: pass the folder that holds the downloaded checkpoint")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json: pass the folder that holds the downloaded checkpoint")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e})") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard {missing[0]} listed in model.safetensors.index.json is missing")
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder} holds no .safetensors weights")
    return HFCheckpoint(folder, config, files)
