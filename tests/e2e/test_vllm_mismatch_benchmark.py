"""gspo_benchmarks.vllm_mismatch on tiny shapes: one real bfloat16 engine (`make test-vllm`: .venv-vllm)."""

import json
import math
import os

import pytest

pytest.importorskip("vllm", reason="vLLM tests run in .venv-vllm: make test-vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from gspo_benchmarks import vllm_mismatch  # noqa: E402

LENGTHS = (4, 16)


def test_bfloat16_engine_table_and_product_weights_over_exact_lengths(tmp_path, capfd):
    out = tmp_path / "mismatch.json"
    lengths = ",".join(map(str, LENGTHS))
    args = ["--dtypes", "bfloat16", "--lengths", lengths, "--prompts", "1", "--group", "4", "--json", str(out)]
    assert vllm_mismatch.main(args) == 0
    table = capfd.readouterr().out
    assert table.count("| bfloat16 |") == len(LENGTHS)

    result = json.loads(out.read_text())["results"]["bfloat16"]
    assert result["engine_dtype"] == "torch.bfloat16"
    for length in LENGTHS:
        stats = result[str(length)]
        assert stats["sequences"] == 4
        assert stats["token_abs_max"] > 1e-4  # a bfloat16 engine against float32 training
        assert stats["seq_abs_max"] <= stats["token_abs_max"]
        assert 0 <= stats["outside_clip_band"] <= 1
        # every completion has exactly `length` tokens, so TRL's product weight is the length-normalised one to the
        # power `length`, sequence by sequence (and so are the extremes)
        for side in ("min", "max"):
            product, normalized = stats[f"product_weight_{side}"], stats[f"normalized_weight_{side}"]
            assert math.isclose(product, normalized**length, rel_tol=1e-9)
        assert stats["product_weight_max"] != stats["normalized_weight_max"]
