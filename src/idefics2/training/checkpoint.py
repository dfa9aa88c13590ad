"""Training state on disk: safetensors for tensors, JSON for everything else (never pickle).

A checkpoint folder holds the model weights (a complete checkpoint, a PEFT adapter, or `model.safetensors` for
a plain module), `optimizer.safetensors` + `optimizer.json`, `trainer_state.json` (step, scheduler, settings)
and per-rank `rng_state_{rank}.safetensors` / `rng_state_{rank}.json`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from idefics2.training import lora

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_CONFIG = "optimizer.json"


def _unique_storage(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the first name of tensors that share memory (tied weights): safetensors refuses duplicates."""
    seen, out = set(), {}
    for name, tensor in named.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor.detach().cpu().contiguous()
    return out


# --- model weights
def save_model_weights(model: nn.Module, folder: Path, lora_config: lora.LoraConfig | None) -> None:
    if lora_config is not None:
        lora.save_adapter(model, lora_config, folder)
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
    else:
        save_file(_unique_storage(model.state_dict()), str(folder / "model.safetensors"))


def load_trainable_weights(model: nn.Module, folder: Path) -> None:
    """Copy the trainable parameters saved in a checkpoint folder back into `model` (by name)."""
    if (folder / lora.ADAPTER_WEIGHTS).is_file():
        _, saved = lora.read_adapter(folder)
    else:
        files = sorted(folder.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder} holds no model weights to resume from")
        saved = {}
        for file in files:
            saved.update(load_file(str(file)))
    missing = []
    with torch.no_grad():
        for name, param in model.named_parameters():  # named_parameters lists each tied tensor once
            if not param.requires_grad:
                continue
            if name not in saved:
                missing.append(name)
            elif saved[name].shape != param.shape:
                raise ValueError(
                    f"checkpoint tensor {name} has shape {tuple(saved[name].shape)}, "
                    f"the model expects {tuple(param.shape)}"
                )
            else:
                param.copy_(saved[name])
    if missing:
        raise ValueError(f"checkpoint {folder} lacks trainable weights: {', '.join(missing[:5])}")


# --- optimizer
def save_optimizer(optimizer: torch.optim.Optimizer, param_names: dict[int, str], folder: Path) -> None:
    """Optimizer state keyed by parameter name; `param_names` maps id(param) -> name."""
    tensors, scalars = {}, {}
    for param, state in optimizer.state.items():
        name = param_names[id(param)]
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}.{key}"] = value
    groups = []
    for group in optimizer.param_groups:
        entry = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        entry["params"] = [param_names[id(p)] for p in group["params"]]
        groups.append(entry)
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    (folder / OPTIMIZER_CONFIG).write_text(json.dumps({"param_groups": groups, "scalars": scalars}, indent=1))


def load_optimizer(optimizer: torch.optim.Optimizer, param_names: dict[int, str], folder: Path) -> None:
    meta = json.loads((folder / OPTIMIZER_CONFIG).read_text())
    tensors = load_file(str(folder / OPTIMIZER_TENSORS))
    saved_groups = meta["param_groups"]
    if [g["params"] for g in saved_groups] != [
        [param_names[id(p)] for p in g["params"]] for g in optimizer.param_groups
    ]:
        raise ValueError(
            f"the optimizer in {folder} was built for other parameters (different model, LoRA "
            "settings or frozen parts): resume with the settings of the original run"
        )
    for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        for key, value in saved.items():
            if key != "params":
                group[key] = tuple(value) if key == "betas" else value
    optimizer.state.clear()
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = param_names[id(param)]
            state = {}
            for key, value in tensors.items():
                if key.startswith(name + ".") and "." not in key[len(name) + 1 :]:
                    state[key[len(name) + 1 :]] = value.to(param.device)
            for key, value in meta["scalars"].items():
                if key.startswith(name + ".") and "." not in key[len(name) + 1 :]:
                    state[key[len(name) + 1 :]] = value
            if state:
                optimizer.state[param] = state


# --- RNG
def save_rng(folder: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    save_file(tensors, str(folder / f"rng_state_{rank}.safetensors"))
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    (folder / f"rng_state_{rank}.json").write_text(json.dumps(state))


def load_rng(folder: Path, rank: int) -> None:
    tensors_path = folder / f"rng_state_{rank}.safetensors"
    if not tensors_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no RNG state for rank {rank} (was it saved with another world size?)"
        )
    tensors = load_file(str(tensors_path))
    torch.set_rng_state(tensors["torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    state = json.loads((folder / f"rng_state_{rank}.json").read_text())
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint-N folder with the highest N that holds a complete trainer state."""
    found = []
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (path / TRAINER_STATE).is_file():
            found.append((int(suffix), path))
    return max(found)[1] if found else None
