"""Model loading: Hugging Face directories, GGUF files, the embedded default, random presets."""

from rapid.models.loading import LoadedModel, ModelLoadError, ModelSpec, RopeScaling, load_model

__all__ = ["LoadedModel", "ModelLoadError", "ModelSpec", "RopeScaling", "load_model"]
