"""The routers' centroid files, one format for both: a safetensors file holding the float32 tensor `centroids`, with
the experts' names in order (and how the rows were made) as metadata.

    text router        (router.safetensors)          [n_experts, dim]
    hidden-state router (router_hidden.safetensors)  [n_layers + 1, n_experts, hidden]
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loramix.errors import LoramixError

REBUILD = {2: "loramix router build", 3: "loramix router hidden"}  # the command that makes each kind


def save_centroids(path: Path, centroids: torch.Tensor, expert_names: list[str], **metadata) -> None:
    info = {"experts": ",".join(expert_names), **{key: str(value) for key, value in metadata.items()}}
    save_file({"centroids": centroids.float().contiguous()}, str(path), metadata=info)


def load_centroids(path: Path, n_experts: int, rank: int = 2) -> torch.Tensor:
    """The centroids, checked: a tensor of `rank` dimensions whose experts' axis (the one before the last) has one
    row per expert of the bundle."""
    command = REBUILD[rank]
    if not Path(path).is_file():
        raise LoramixError(f"Router file {path} is missing; build it with `{command} {Path(path).parent}`.")
    try:
        centroids = load_file(str(path))["centroids"].float()
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        message = f"Router file {path} is corrupt or has no 'centroids' tensor; rebuild it with `{command}`."
        raise LoramixError(message) from exc
    if centroids.dim() != rank or centroids.shape[-2] != n_experts:
        shape = "[n_experts, dim]" if rank == 2 else "[layers, n_experts, hidden]"
        raise LoramixError(
            f"Router file {path} has centroids of shape {tuple(centroids.shape)}, not {shape}, but the bundle lists "
            f"{n_experts} experts; rebuild it with `{command}`."
        )
    return centroids
