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
                    for name in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                        tensors[name] = f.get_tensor(name)
            except Exception as e:  # noqa: BLE001 (safetensors raises its own error types on a damaged header)
                raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
        return tensors


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; CheckpointError in one line otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def read_hf_folder(path: str | Path) -> HFCheckpoint:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: pass the folder that holds the downloaded checkpoint")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json: pass the folder that holds the downloaded checkpoint")
    config = read_json_object(config_path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v and v
                                                       for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map is not an object of tensor names to shard file names")
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
