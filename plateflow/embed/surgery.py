"""Inference-only rewrites of a loaded model, in place (as timm keeps ``reparameterize_model``
apart from data loading): the same function in fewer passes over the activations."""

from __future__ import annotations

import functools


def fold_layer_scale(net) -> None:
    """Fold each transformer block's LayerScale (DINOv2's per-channel gains after the attention
    and MLP outputs) into the linear layer before it: gamma * (x W^T + b) = x (gamma W)^T +
    gamma b. The same function with two elementwise passes over the activations fewer per block.
    In place, and a no-op when done already or for models without LayerScale."""
    import torch

    with torch.no_grad():
        for block in getattr(net, "blocks", ()):
            for scale, linear in (("ls1", getattr(block, "attn", None) and block.attn.proj),
                                  ("ls2", getattr(block, "mlp", None) and block.mlp.fc2)):
                gamma = getattr(getattr(block, scale, None), "gamma", None)
                if gamma is None or not isinstance(linear, torch.nn.Linear):
                    continue
                linear.weight.mul_(gamma[:, None].to(linear.weight.dtype))
                if linear.bias is not None:
                    linear.bias.mul_(gamma.to(linear.bias.dtype))
                setattr(block, scale, torch.nn.Identity())


def fuse_gelu_epilogue(net) -> None:
    """Give each timm transformer block's MLP (fc1, GELU, fc2) a forward pass whose fc1 applies
    the GELU in the matrix product's epilogue (cuBLASLt, through ``torch._addmm_activation``):
    the 4x-wide hidden activations are written once instead of written, read and written again.
    cuBLASLt's GELU is the tanh form, whose difference from the exact one the models were
    trained with is under bf16's resolution (on the CPU torch applies the exact GELU). In
    place; the ViewEncoder uses it for GPU classes in reduced precision only; what it gained
    and how close the vectors stay is in HISTORY.md."""
    import torch
    from timm.layers import Mlp

    for block in getattr(net, "blocks", ()):
        mlp = getattr(block, "mlp", None)
        if (type(mlp) is Mlp and type(mlp.act) is torch.nn.GELU and isinstance(mlp.norm, torch.nn.Identity)
                and mlp.fc1.bias is not None):
            block.mlp = _gelu_epilogue_mlp()(mlp.fc1, mlp.fc2)


@functools.cache
def _gelu_epilogue_mlp():
    import torch

    class GeluEpilogueMlp(torch.nn.Module):
        """fc2(gelu(fc1(x))), the GELU in fc1's matrix product (inference only: no dropout)."""

        def __init__(self, fc1, fc2):
            super().__init__()
            self.fc1, self.fc2 = fc1, fc2

        def forward(self, x):
            flat = x.reshape(-1, x.shape[-1])
            hidden = torch._addmm_activation(self.fc1.bias, flat, self.fc1.weight.t(), use_gelu=True)
            return self.fc2(hidden.view(*x.shape[:-1], -1))

    return GeluEpilogueMlp
