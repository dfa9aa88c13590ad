"""Training state on disk: safetensors for tensors, JSON for everything else (never pickle).

A checkpoint folder holds the model weights (a complete checkpoint, a PEFT adapter, or `model.safetensors` for
a plain module), `optimizer.safetensors` + `optimizer.json`, `trainer_state.json` (step, scheduler, settings)
and per-rank `rng_state_{rank}.safetensors` / `rng_state_{rank}.json`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from idefics2 import lora

if TYPE_CHECKING:
    from idefics2.processing import Idefics2Processor

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
def model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The model's full weights by name. Sharded (FSDP): a collective call; rank 0 gets CPU copies, the other
    ranks an empty dict. Otherwise the live tensors themselves (no copy)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_model_weights(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    folder: Path,
    lora_config: lora.LoraConfig | None,
    processor: Idefics2Processor | None = None,
) -> None:
    """Write `state` (from model_state) as a PEFT adapter (LoRA), a complete checkpoint (models with
    save_pretrained; with `processor`, its files too, so that the folder loads on its own, in transformers as
    well) or a plain model.safetensors."""
    if lora_config is not None:
        tensors = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
        lora.write_adapter(tensors, lora_config, folder)
    elif hasattr(model, "save_pretrained"):
        _plain_module(model, state).save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
    else:
        save_file(_unique_storage(state), str(folder / "model.safetensors"))


def _plain_module(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """`model` itself, or for an FSDP-sharded model an unsharded twin holding `state` (built on the meta
    device, then given the gathered tensors: no extra copy)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        twin = cls(model.config)
    twin.load_state_dict(state, assign=True)
    if hasattr(twin, "tie_weights"):
        twin.tie_weights()
    twin.generation_config = getattr(model, "generation_config", {})
    return twin


def read_trainable_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights saved in a checkpoint folder (adapter tensors under the model's own names)."""
    if (folder / lora.ADAPTER_WEIGHTS).is_file():
        return lora.read_adapter(folder)[1]
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no model weights to resume from")
    saved = {}
    for file in files:
        saved.update(load_file(str(file)))
    return saved


def load_trainable_weights(model: nn.Module, saved: dict[str, torch.Tensor], sharded: bool) -> None:
    """Put the saved values of every trainable parameter back into `model` (by name)."""
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    missing = [name for name in trainable if name not in saved]
    if missing:
        raise ValueError(f"the checkpoint lacks trainable weights: {', '.join(missing[:5])}")
    for name, param in trainable.items():
        if saved[name].shape != param.shape:
            raise ValueError(
                f"checkpoint tensor {name} has shape {tuple(saved[name].shape)}, "
                f"the model expects {tuple(param.shape)}"
            )
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        subset = {name: saved[name] for name in trainable}
        set_model_state_dict(model, subset, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])


# --- optimizer
def optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, names: dict[int, str], sharded: bool
) -> dict:
    """{"state": {param name: {key: value}}, "param_groups": [{..., "params": [param names]}]}.
    Sharded (FSDP): a collective call that gathers full tensors on rank 0."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=options)
    state = {names[id(p)]: dict(values) for p, values in optimizer.state.items()}
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    return {"state": state, "param_groups": groups}


def save_optimizer_state(state: dict, folder: Path) -> None:
    tensors, scalars = {}, {}
    for name, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}.{key}"] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]
    ]
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    (folder / OPTIMIZER_CONFIG).write_text(json.dumps({"param_groups": groups, "scalars": scalars}, indent=1))


def read_optimizer_state(folder: Path) -> dict:
    meta = json.loads((folder / OPTIMIZER_CONFIG).read_text())
    flat = {**load_file(str(folder / OPTIMIZER_TENSORS)), **meta["scalars"]}
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    state: dict[str, dict] = {}
    for group in groups:
        for name in group["params"]:
            values = {
                key[len(name) + 1 :]: value
                for key, value in flat.items()
                if key.startswith(name + ".") and "." not in key[len(name) + 1 :]
            }
            if values:
                state[name] = values
    return {"state": state, "param_groups": groups}


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, names: dict[int, str], state: dict, sharded: bool
) -> None:
    saved_params = [g["params"] for g in state["param_groups"]]
    if saved_params != [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]:
        raise ValueError(
            "the checkpoint's optimizer was built for other parameters (another model, LoRA setting "
            "or frozen part): resume with the settings of the original run"
        )
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    optimizer.state.clear()
    for group in optimizer.param_groups:
        for param in group["params"]:
            values = state["state"].get(names[id(param)])
            if values:
                optimizer.state[param] = {
                    k: v.to(param.device) if torch.is_tensor(v) else v for k, v in values.items()
                }


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


# What a run writes into its output folder besides checkpoint-N/: the adapter (LoRA) or the model and its
# processor (full training).
RUN_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
# Any of these means the folder holds a run's result (the processor files alone do not).
_RUN_MARKERS = ("adapter_config.json", "adapter_model.safetensors", "config.json", "model*.safetensors")


def previous_run(output_dir: Path) -> list[Path]:
    """The checkpoint-N folders and the weights a previous run left in `output_dir` (empty: none)."""
    if not output_dir.is_dir():
        return []
    found = {p for p in output_dir.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()}
    found |= {p for pattern in _RUN_MARKERS for p in output_dir.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: (not p.is_dir(), _step(p), p.name))


def remove_previous_run(output_dir: Path) -> None:
    """Delete the checkpoint-N folders and the files a run writes (RUN_FILES); anything else stays."""
    for path in output_dir.glob("checkpoint-*"):
        if path.name.removeprefix("checkpoint-").isdigit() and path.is_dir():
            shutil.rmtree(path)
    for pattern in RUN_FILES:
        for path in output_dir.glob(pattern):
            if path.is_file():
                path.unlink()


def _step(path: Path) -> int:
    suffix = path.name.removeprefix("checkpoint-")
    return int(suffix) if suffix.isdigit() else -1
