"""`dsv3 generate` and `dsv3 convert` on a checkpoint trained here, with MTP modules and a tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import fit

from dsv3_lightning.cli import main
from dsv3_lightning.generate import run
from dsv3_lightning.loading import load_trained
from dsv3_lightning.model import DeepSeekV3

MTP = """
model:
  heads:
    - class_path: dsv3_lightning.plugins.mtp.MultiTokenPrediction
      init_args: {depth: 1, loss_weight: 0.3}
data:
  extra_tokens: 1
"""


@pytest.fixture(autouse=True)
def _plain_argv(plain_argv):
    """Every test here calls the CLI."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("trained")
    (root / "mtp.yaml").write_text(MTP)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["dsv3"])
        fit(root, corpus, 3, "--config", str(root / "mtp.yaml"))
    return next(root.glob("run/version_0/checkpoints/last.ckpt"))


def test_generate_streams_text_and_speculative_equals_plain_greedy(trained, capsys):
    plain = run(str(trained), "def ", max_new_tokens=12, speculative=False)
    out_plain = capsys.readouterr()
    fast = run(str(trained), "def ", max_new_tokens=12)
    out_fast = capsys.readouterr()
    assert fast == plain and len(plain) == 12
    assert out_plain.out == out_fast.out and out_plain.out.startswith("def ")
    assert "tokens/s" in out_plain.err and "draft acceptance by depth" in out_fast.err


def test_generate_through_the_dsv3_command_with_sampling_and_a_stop_string(trained, capsys):
    main(["generate", "--ckpt_path", str(trained), "--prompt", "import", "--max_new_tokens", "20",
          "--temperature", "1.0", "--top_k", "5", "--seed", "3"])
    first = capsys.readouterr().out
    main(["generate", "--ckpt_path", str(trained), "--prompt", "import", "--max_new_tokens", "20",
          "--temperature", "1.0", "--top_k", "5", "--seed", "3"])
    assert capsys.readouterr().out == first  # seeded sampling is reproducible
    stop = first[len("import"):][3:5]
    if stop.strip():
        run(str(trained), "import", max_new_tokens=20, temperature=1.0, top_k=5, seed=3, stop=stop)
        text = capsys.readouterr().out
        assert stop not in text[len("import"):] and len(text) < len(first)


def test_convert_round_trip_keeps_weights_mtp_and_tokenizer(trained, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    main(["convert", str(trained), str(hf_dir), "--max_shard_size", "200000"])
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "model.safetensors.index.json").is_file()
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 1

    original = load_trained(trained)
    exported = DeepSeekV3.from_pretrained(hf_dir)
    for key, tensor in original.model.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], tensor, rtol=0, atol=0)
    assert any(k.startswith("model.layers.2.eh_proj") for k in exported.hf_origin.extra_keys)

    back = tmp_path / "back.ckpt"
    main(["convert", str(hf_dir), str(back)])
    reloaded = load_trained(back)
    assert [type(h).__name__ for h in reloaded.heads] == ["MultiTokenPrediction"]
    for key, tensor in original.heads[0].state_dict().items():
        torch.testing.assert_close(reloaded.heads[0].state_dict()[key], tensor, rtol=0, atol=0)
    assert reloaded.tokenizer.to_str() == original.tokenizer.to_str()
    assert run(str(back), "def ", max_new_tokens=6) == run(str(trained), "def ", max_new_tokens=6)
    capsys.readouterr()


def test_bad_input_is_named(trained, tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        run(str(trained), "x " * 100, max_new_tokens=4)
    hf_dir = tmp_path / "hf"
    main(["convert", str(trained), str(hf_dir)])
    (hf_dir / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="--tokenizer"):
        run(str(hf_dir), "def ")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "hyper_parameters": {"lr": 1}}, other)
    with pytest.raises(ValueError, match="another architecture"):
        run(str(other), "def ")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        main(["convert", str(hf_dir), str(tmp_path / "x.ckpt")])


def test_convert_dequantizes_deepseek_fp8_checkpoints(trained, tmp_path):
    from dsv3_lightning.plugins.fp8.checkpoint import quantize_checkpoint

    main(["convert", str(trained), str(tmp_path / "hf")])
    quantize_checkpoint(tmp_path / "hf", tmp_path / "fp8")
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    main(["convert", str(tmp_path / "fp8"), str(tmp_path / "dequantized")])
    original = DeepSeekV3.from_pretrained(tmp_path / "hf").state_dict()
    restored = DeepSeekV3.from_pretrained(tmp_path / "dequantized").state_dict()
    quantized = 0
    for key, tensor in original.items():
        error = (restored[key].float() - tensor.float()).norm() / tensor.float().norm().clamp_min(1e-12)
        assert error < 0.05, key  # E4M3 keeps 3 mantissa bits: a few percent at most
        quantized += bool(error > 0)
    assert quantized > 0  # the layers' weights really went through FP8
