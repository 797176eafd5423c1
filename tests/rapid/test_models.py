import pytest
import torch

from rapid.models import ModelLoadError, ModelSpec, RopeScaling, load_model
from rapid.models import default as default_model


def test_tiny_preset_is_seeded():
    a = load_model(ModelSpec("tiny", seed=3)).model
    b = load_model(ModelSpec("tiny", seed=3)).model
    c = load_model(ModelSpec("tiny", seed=4)).model
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_model_directory_round_trip(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(ModelSpec(str(tmp_path)))
    ids = torch.arange(20)[None]
    torch.testing.assert_close(loaded.model(ids).logits, tiny.model(ids).logits)
    assert loaded.tokenizer.decode(loaded.tokenizer("héllo").input_ids) == "héllo"
    assert loaded.config._attn_implementation == "rapid"
    assert len(loaded.revision) == 16


def test_bf16(tiny, tmp_path):
    lm = load_model(ModelSpec("tiny", dtype="bfloat16"))
    assert lm.model.dtype == torch.bfloat16


def test_bf16_keeps_rope_frequencies_in_fp32():
    fp32 = load_model(ModelSpec("tiny")).model
    bf16 = load_model(ModelSpec("tiny", dtype="bfloat16")).model
    assert next(bf16.parameters()).dtype == torch.bfloat16
    frequencies = dict(fp32.named_buffers())
    for name, buffer in bf16.named_buffers():
        if name.endswith("inv_freq"):
            assert buffer.dtype == torch.float32 and torch.equal(buffer, frequencies[name])


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no model at"):
        load_model(ModelSpec(str(tmp_path / "missing")))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(ModelSpec(str(tmp_path)))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(ModelSpec(str(tmp_path / "weights.bin")))


def test_corrupt_gguf_is_refused(tmp_path):
    bad = tmp_path / default_model.GGUF_NAME
    bad.write_bytes(b"not a model")
    with pytest.raises(default_model.ModelFetchError, match="corrupt"):
        default_model.verify_gguf(bad)


def test_rope_scaling_stretches_the_context():
    lm = load_model(ModelSpec("tiny", rope_scaling=RopeScaling("yarn", 4.0)))
    assert lm.max_context == 4 * 4096
    assert lm.config.rope_parameters["rope_type"] == "yarn"
    with pytest.raises(ValueError):
        RopeScaling("linear-ish", 2.0)
