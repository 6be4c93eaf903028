"""Strict weight loading, shared by every family: safetensors only, and nothing left random."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from featcache.errors import WeightsError
from featcache.io import write_atomic


def no_hub_error(name: str, source: str, exc: Exception) -> WeightsError:
    takes = (
        "a directory where save_pretrained wrote the model and its image processor"
        if name.startswith("hf:")
        else "a directory from save_pretrained, or a .safetensors file"
    )
    return WeightsError(
        f"cannot download weights for {name} ({source}): the Hugging Face Hub is unreachable "
        f"or refused ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Save the "
        f"weights on a machine with network and pass --weights PATH ({takes})."
    )


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or the single one inside a directory. Never unpickles."""
    from safetensors.torch import load_file

    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise WeightsError(
                f"--weights {path}: expected exactly one .safetensors file in the directory, "
                f"found {len(files)}; pass the file itself"
            )
        path = files[0]
    if path.suffix != ".safetensors":
        raise WeightsError(
            f"--weights {path}: only .safetensors files (or directories holding one) are "
            "loaded; pickled checkpoints are refused because unpickling can run code. "
            "Convert with safetensors.torch.save_file(model.state_dict(), 'model.safetensors')."
        )
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise WeightsError(f"--weights {path}: not a valid safetensors file ({exc})") from exc


def refuse_misfit(source, missing, unexpected, bad_shape) -> None:
    """Weights that lack a tensor, bring an unknown one or change a shape are refused by name:
    nothing is ever left at its random initialisation."""
    missing, unexpected, bad_shape = sorted(missing), sorted(unexpected), sorted(bad_shape)
    if missing or unexpected or bad_shape:
        raise WeightsError(
            f"{source} does not fit this architecture: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(bad_shape)} with another shape (e.g. {bad_shape[:3]})"
        )


def uninitialised(make) -> nn.Module:
    """``make()``'s model with its tensors allocated but not initialised (built on the meta
    device, then made empty): for a model that a strict load fills next, which makes its
    random initialisation wasted work (0.7 s for timm's ViT-B/16 on 2 cores). A model with
    buffers computed in its constructor and absent from checkpoints (non-persistent) is
    built as usual."""
    with torch.device("meta"):
        model = make()
    if any(m._non_persistent_buffers_set for m in model.modules()):
        return make()
    return model.to_empty(device="cpu")


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source) -> None:
    own = model.state_dict()
    refuse_misfit(
        f"--weights {source}",
        set(own) - set(state),
        set(state) - set(own),
        [k for k in own if k in state and own[k].shape != state[k].shape],
    )
    model.load_state_dict(state)


def check_loading_info(source: str, info: dict, heads: tuple[str, ...] = ()) -> None:
    """Refuse what transformers' ``from_pretrained`` reported but only logged: missing,
    unexpected (beyond the ``heads`` that no feature uses) and reshaped tensors."""
    refuse_misfit(
        source,
        info["missing_keys"],
        [k for k in info["unexpected_keys"] if not k.startswith(heads)],
        [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]],
    )


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Tensors and JSON metadata as one safetensors file, written whole or not at all
    (SimCLR's checkpoints and exported encoders)."""
    import json

    from safetensors.torch import save

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, save(cpu, metadata={"featcache": json.dumps(meta)}))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """What ``save_tensors`` wrote: (tensors, metadata)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["featcache"])
        return {k: f.get_tensor(k) for k in f.keys()}, meta
