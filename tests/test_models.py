"""Model loading: the built-in SmolLM2 from its GGUF (cached as safetensors), sources, errors."""

import pytest
import torch

from privlora.errors import ConfigError
from privlora.models import builtin_gguf_path, compute_threads, load_model, local_source


def test_builtin_gguf_is_found_through_package_metadata():
    path = builtin_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()


def test_bad_model_names(tmp_path):
    with pytest.raises(ConfigError, match="no such GGUF"):
        local_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="config.json"):
        local_source(str(tmp_path))
    with pytest.raises(ConfigError, match="no such directory"):
        local_source(str(tmp_path / "absent-model"))
    with pytest.raises(ConfigError, match="no such directory"):
        local_source("./runs/absent-model")
    assert local_source("some-org/some-model") == "some-org/some-model"  # a hub id, untouched


def test_a_model_that_cannot_be_loaded_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="could not be loaded"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_builtin_model_answers_a_chat_prompt(tokenizer):
    model = load_model("builtin", "float32")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][ids.shape[1]:])
    # the cache is a plain HF directory: safetensors weights + config + tokenizer
    cached = local_source("builtin")
    assert (__import__("pathlib").Path(cached) / "model.safetensors").is_file()


def test_auto_dtype_is_bf16_only_where_the_cpu_has_it_natively(tmp_path):
    from privlora.models import native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("flags\t: fpu sse avx2 avx512f avx512bw\n")
    assert not native_bf16(info)
    info.write_text("flags\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    assert native_bf16(info)
    info.write_text("flags\t: fpu amx_bf16 amx_tile\n")
    assert native_bf16(info)
    assert not native_bf16(tmp_path / "absent")


def test_compute_threads_pins_the_count_and_restores_it():
    """train.threads: a local update runs on exactly that many CPU threads (0: as they are)."""
    before = torch.get_num_threads()
    with compute_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), compute_threads(before + 1):
        raise RuntimeError("a failed round")
    assert torch.get_num_threads() == before
    with compute_threads(0):
        assert torch.get_num_threads() == before
