"""BatchFeature: the dict the processors return, with attribute access and `.to(...)`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class BatchFeature(dict):
    """A dict of model inputs; keys are also attributes (`batch.input_ids`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Move every tensor like `Tensor.to`; a dtype only applies to floating-point tensors."""
        moved = BatchFeature()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                if value.is_floating_point():
                    value = value.to(*args, **kwargs)
                else:
                    value = value.to(
                        *[a for a in args if not isinstance(a, torch.dtype)],
                        **{k: v for k, v in kwargs.items() if k != "dtype"},
                    )
            moved[key] = value
        return moved


def convert_tensors(data: dict[str, Any], return_tensors: str | None) -> BatchFeature:
    """Turn list / numpy values into torch tensors ("pt"), numpy arrays ("np") or leave them (None)."""
    if return_tensors not in (None, "pt", "np"):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
    out = BatchFeature()
    for key, value in data.items():
        ragged = isinstance(value, list) and len({len(v) for v in value if isinstance(v, list)}) > 1
        if return_tensors is not None and ragged:
            raise ValueError(f"{key} rows have different lengths: pass padding=True to return tensors")
        if return_tensors == "pt" and not isinstance(value, torch.Tensor):
            value = torch.from_numpy(value) if isinstance(value, np.ndarray) else torch.tensor(value)
        elif return_tensors == "np":
            value = value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        out[key] = value
    return out
