"""Reference timm models for parity tests: random init with a fixed seed and random BatchNorm
statistics (default 0/1 statistics would hide a wrong running-stat mapping)."""
import numpy as np
import timm
import torch
from safetensors.torch import save_file


def timm_model(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=kw.pop("num_classes", 1000), **kw).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, buf in model.named_buffers():
            if key.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif key.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    return model


def save_safetensors(model: torch.nn.Module, path: str) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def timm_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()
