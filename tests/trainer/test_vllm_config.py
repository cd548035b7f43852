"""vLLM settings that are checked at construction, in any environment (vLLM need not be installed)."""

import importlib.util

import pytest
from conftest import completion_length_reward, prompt_dataset, small_config

from trl_gspo import GSPOConfig, GSPOTrainer, GSPOUnusedSettingWarning

VLLM_MISSING = importlib.util.find_spec("vllm") is None


@pytest.mark.skipif(not VLLM_MISSING, reason="vLLM is installed here")
def test_use_vllm_without_vllm_names_the_install_command_before_the_model_loads(tmp_path):
    args = small_config(tmp_path, use_vllm=True, vllm_mode="colocate")
    model_path = str(tmp_path / "never-read")  # the error comes before the model would load
    with pytest.raises(ImportError, match=r"vLLM is not installed: `pip install 'vllm") as raised:
        GSPOTrainer(model_path, completion_length_reward, args=args, train_dataset=prompt_dataset())
    assert "make " not in str(raised.value)  # a pip user has no Makefile


def test_vllm_dtype_is_validated(tmp_path):
    with pytest.raises(ValueError, match=r"vllm_dtype='fp32' is not supported; expected one of"):
        GSPOConfig(str(tmp_path), use_cpu=True, use_vllm=True, vllm_dtype="fp32")


def test_vllm_dtype_is_refused_in_server_mode(tmp_path):
    with pytest.raises(ValueError, match=r"vllm_dtype='float32'.*vllm_mode='server'.*vllm-serve --dtype float32"):
        GSPOConfig(str(tmp_path), use_cpu=True, use_vllm=True, vllm_mode="server", vllm_dtype="float32")


def test_vllm_dtype_without_vllm_warns_unused(tmp_path):
    with pytest.warns(GSPOUnusedSettingWarning, match=r"vllm_dtype='float32' needs use_vllm=True"):
        GSPOConfig(str(tmp_path), use_cpu=True, vllm_dtype="float32")
