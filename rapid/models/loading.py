"""Loading causal LMs: any Hugging Face model directory, any GGUF file, the embedded default, or a preset.

Everything returns a `LoadedModel`: the module in eval mode with our attention implementation, its
tokenizer, and the identity (`model_id`, `revision`) that persisted caches are keyed by.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rapid.attention import ATTENTION_NAME, register_attention
from rapid.models import default as default_model
from rapid.models.presets import PRESETS, build_preset

RopeScalingKind = Literal["yarn", "dynamic"]


class ModelLoadError(RuntimeError):
    """A model path or option is unusable; the message says why."""


@dataclass(frozen=True)
class RopeScaling:
    """Stretch RoPE beyond the model's native context. YaRN is static (cached keys stay valid);
    dynamic NTK recomputes frequencies from the current length, so cached keys drift — prefer YaRN."""

    kind: RopeScalingKind = "yarn"
    factor: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in ("yarn", "dynamic"):
            raise ValueError(f"rope scaling kind must be 'yarn' or 'dynamic', got {self.kind!r}")
        if not self.factor >= 1.0:
            raise ValueError(f"rope scaling factor must be >= 1, got {self.factor}")


@dataclass(frozen=True)
class ModelSpec:
    """What to load. `source` is "default", a preset name ("tiny", "long-bench"), a model directory,
    or a .gguf file."""

    source: str = "default"
    device: str = "auto"  # "auto" picks CUDA when present, else CPU
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    rope_scaling: RopeScaling | None = None
    seed: int = 0  # presets only


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None  # a transformers tokenizer; None for presets built without one
    model_id: str
    revision: str  # content hash of the config and weights' names and sizes

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_context(self) -> int:
        return int(self.model.config.max_position_embeddings)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return resolved


def revision_hash(model_dir: Path) -> str:
    digest = hashlib.sha256()
    config = model_dir / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def apply_rope_scaling(config, scaling: RopeScaling | None) -> None:
    if scaling is None:
        return
    native = int(config.max_position_embeddings)
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = {"rope_type": scaling.kind, "factor": float(scaling.factor), "rope_theta": theta}
    if scaling.kind == "yarn":
        params["original_max_position_embeddings"] = native
    config.rope_parameters = params
    config.max_position_embeddings = int(native * scaling.factor)


def cast_model(model: torch.nn.Module, dtype: torch.dtype, device: torch.device | None = None) -> torch.nn.Module:
    """`model` (in place) in `dtype`, except RoPE's frequency buffers, which stay float32.

    `Module.to(dtype)` would round `inv_freq` too: in bf16 its relative error of 2^-9 turns into
    whole radians of phase error by position 16K (position x frequency), so long contexts would run
    on different frequencies than the model was trained with.
    """
    frequencies = {name: buffer.float() for name, buffer in model.named_buffers() if name.endswith("inv_freq")}
    model.to(device=device, dtype=dtype)
    for name, buffer in frequencies.items():
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, buffer.to(device or buffer.device))
    return model


def _finish(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    register_attention()
    model.config._attn_implementation = ATTENTION_NAME
    return cast_model(model, dtype, device).eval()


def load_model(spec: ModelSpec = ModelSpec(), cache_dir: Path | None = None) -> LoadedModel:
    """Load `spec.source` with our attention implementation, on the requested device and dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(spec.device)
    dtype = getattr(torch, spec.dtype)
    if spec.source in PRESETS:
        model, tokenizer = build_preset(spec.source, seed=spec.seed, rope_scaling=spec.rope_scaling,
                                        apply_rope_scaling=apply_rope_scaling, cache_dir=cache_dir)
        return LoadedModel(_finish(model, device, dtype), tokenizer, f"preset:{spec.source}",
                           revision=f"seed{spec.seed}")

    if spec.source == "default":
        path = default_model.pull_default_model(cache_dir).converted
        model_id = f"default:{default_model.DEFAULT_MODEL_NAME}"
    else:
        path = Path(spec.source).expanduser()
        model_id = str(path.resolve())
    if not path.exists():
        raise ModelLoadError(f"no model at {path}: give a model directory, a .gguf file, 'default' or "
                             f"one of the presets {sorted(PRESETS)}")

    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; give a model directory or a GGUF file")
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        config.__dict__.pop("quantization_config", None)
        apply_rope_scaling(config, spec.rope_scaling)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        revision = hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode()).hexdigest()[:16]
        return LoadedModel(_finish(model, device, dtype), tokenizer, model_id, revision)

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model directory?")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read the config in {path}: {err}") from err
    apply_rope_scaling(config, spec.rope_scaling)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(_finish(model, device, dtype), tokenizer, model_id, revision_hash(path))
