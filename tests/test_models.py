"""bgpo.models: LLaDA (config, meta build, checkpoint names), the Hugging Face adapter, checkpointing."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bgpo.memory import track_peak_memory
from bgpo.models import (
    HFMaskedDiffusionAdapter,
    LLaDAConfig,
    LLaDAModelLM,
    MaskedDiffusionLM,
    UnsupportedModelError,
    enable_activation_checkpointing,
    find_blocks,
    llada_state_dict,
    load_llada_weights,
)

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# The fields of GSAI-ML/LLaDA-8B-Instruct's config.json.
LLADA_8B_CONFIG_JSON = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
    "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
    "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "use_cache": False, "vocab_size": 126464,
    "weight_tying": False,
}


# --------------------------------------------------------------------------- config
def test_config_reads_llada_8b_config_json():
    assert LLaDAConfig.from_dict(LLADA_8B_CONFIG_JSON) == LLaDAConfig.preset("llada-8b")


def test_config_round_trip_and_defaults(tmp_path):
    config = LLaDAConfig.preset("tiny", n_kv_heads=2)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert LLaDAConfig.from_json(tmp_path) == config
    derived = LLaDAConfig.from_dict(dict(d_model=64, n_layers=1, n_heads=4, vocab_size=32, mlp_ratio=2,
                                         multi_query_attention=True, mask_token_id=31, eos_token_id=30,
                                         pad_token_id=30))
    assert derived.mlp_hidden_size == 128 and derived.num_kv_heads == 1


@pytest.mark.parametrize(
    "field, value", [("block_type", "sequential"), ("alibi", True), ("scale_logits", True), ("block_group_size", 2)]
)
def test_config_refuses_unsupported_variants(field, value):
    with pytest.raises(ValueError, match=field):
        LLaDAConfig.from_dict({**LLADA_8B_CONFIG_JSON, field: value})


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="name"):
        LLaDAConfig.preset("huge")
    with pytest.raises(ValueError, match="n_kv_heads"):
        LLaDAConfig.preset("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="mask_token_id"):
        LLaDAConfig.preset("tiny", mask_token_id=128)


def test_llada_8b_builds_on_meta_device():
    with torch.device("meta"):
        model = LLaDAModelLM(LLaDAConfig.preset("llada-8b"))
        hidden = model.hidden_states(torch.zeros(2, 16, dtype=torch.long))
    assert all(p.is_meta for p in model.parameters())
    # 2 * 126464 * 4096 (embedding, head) + 32 * (4 * 4096^2 + 3 * 4096 * 12288) + 65 * 4096 (norms)
    assert sum(p.numel() for p in model.parameters()) == 8_015_581_184
    assert hidden.shape == (2, 16, 4096) and model.lm_head_weight.shape == (126464, 4096)


# --------------------------------------------------------------------------- LLaDA forward
def _tiny(seed=0, **overrides) -> LLaDAModelLM:
    torch.manual_seed(seed)
    return LLaDAModelLM(LLaDAConfig.preset("tiny", **overrides)).double().eval()


def test_protocol_and_bidirectionality():
    model = _tiny()
    assert isinstance(model, MaskedDiffusionLM)
    ids = torch.randint(0, 120, (2, 9))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 120
    assert not torch.allclose(model.hidden_states(ids)[:, 0], model.hidden_states(changed)[:, 0])
    logits = model.logits(ids)
    torch.testing.assert_close(logits, model.hidden_states(ids) @ model.lm_head_weight.T)


def test_left_padding_is_invisible():
    model = _tiny()
    ids = torch.randint(0, 120, (1, 7))
    padded = torch.cat((torch.full((1, 3), 126), ids), dim=1)
    mask = torch.cat((torch.zeros(1, 3), torch.ones(1, 7)), dim=1).long()
    torch.testing.assert_close(model.hidden_states(padded, mask)[:, 3:], model.hidden_states(ids))


def test_packed_sequences_match_separate_forwards():
    model = _tiny(n_kv_heads=2)
    a, b = torch.randint(0, 120, (1, 5)), torch.randint(0, 120, (1, 8))
    packed = model(torch.cat((a, b), dim=1), cu_seqlens=torch.tensor([0, 5, 13], dtype=torch.int32))
    torch.testing.assert_close(packed, torch.cat((model(a), model(b)), dim=1))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.cat((a, a)), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


def test_weight_tying_uses_the_embedding():
    model = _tiny(weight_tying=True)
    assert model.lm_head is None and model.lm_head_weight is model.embed.weight and model.lm_head_bias is None


# --------------------------------------------------------------------------- LLaDA checkpoints
def _original_state_dict(config: LLaDAConfig, seed=0) -> dict[str, torch.Tensor]:
    """Random weights under the parameter names of LLaDA's modeling_llada.py (Llama blocks)."""
    g = torch.Generator().manual_seed(seed)
    d, f, v = config.d_model, config.mlp_hidden_size, config.padded_vocab_size
    kv = config.num_kv_heads * config.head_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    sd = {"model.transformer.wte.weight": rand(v, d), "model.transformer.ln_f.weight": 1 + rand(d),
          "model.transformer.ff_out.weight": rand(v, d)}
    for i in range(config.n_layers):
        p = f"model.transformer.blocks.{i}."
        sd |= {p + "attn_norm.weight": 1 + rand(d), p + "ff_norm.weight": 1 + rand(d),
               p + "q_proj.weight": rand(d, d), p + "k_proj.weight": rand(kv, d), p + "v_proj.weight": rand(kv, d),
               p + "attn_out.weight": rand(d, d), p + "ff_proj.weight": rand(f, d), p + "up_proj.weight": rand(f, d),
               p + "ff_out.weight": rand(d, f)}
    return sd


def _reference_llada_logits(sd, config: LLaDAConfig, ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's forward written directly against the original parameter names (float64, explicit softmax)."""
    t = "model.transformer."
    nh, nkv, hd = config.n_heads, config.num_kv_heads, config.head_dim

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    def rope(x):  # x: (B, heads, T, hd); channel i pairs with i + hd/2
        pos = torch.arange(x.shape[2], dtype=torch.float64)[:, None]
        freq = config.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        cos, sin = torch.cos(pos * freq), torch.sin(pos * freq)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    x = sd[t + "wte.weight"][ids]
    batch, length = ids.shape
    for i in range(config.n_layers):
        p = t + f"blocks.{i}."
        h = rms(x, sd[p + "attn_norm.weight"])
        q = (h @ sd[p + "q_proj.weight"].T).view(batch, length, nh, hd).transpose(1, 2)
        k = (h @ sd[p + "k_proj.weight"].T).view(batch, length, nkv, hd).transpose(1, 2)
        v = (h @ sd[p + "v_proj.weight"].T).view(batch, length, nkv, hd).transpose(1, 2)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        weights = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd), dim=-1)
        att = (weights @ v).transpose(1, 2).reshape(batch, length, -1)
        x = x + att @ sd[p + "attn_out.weight"].T
        h = rms(x, sd[p + "ff_norm.weight"])
        x = x + (F.silu(h @ sd[p + "ff_proj.weight"].T) * (h @ sd[p + "up_proj.weight"].T)) @ sd[p + "ff_out.weight"].T
    return rms(x, sd[t + "ln_f.weight"]) @ sd[t + "ff_out.weight"].T


def _write_sharded_checkpoint(directory, config, sd):
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, keys in shards.items():
        safetensors_torch.save_file({k: sd[k].contiguous() for k in keys}, directory / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({**LLADA_8B_CONFIG_JSON, **config.to_dict()}))


def test_loads_sharded_llada_checkpoint_with_original_names(tmp_path):
    config = LLaDAConfig.preset("tiny", n_kv_heads=2)
    sd = {k: v.double() for k, v in _original_state_dict(config).items()}
    _write_sharded_checkpoint(tmp_path, config, sd)
    model = LLaDAModelLM.from_pretrained(tmp_path)
    assert model.config == config and not any(p.is_meta for p in model.parameters())
    assert model.lm_head_weight.dtype == torch.float64
    # The mapping, name by name, and back.
    assert set(llada_state_dict(model)) == set(sd)
    for name, tensor in llada_state_dict(model).items():
        assert torch.equal(tensor, sd[name]), name
    # The forward equals LLaDA's, computed from the original names (catches a swapped gate/up or q/k);
    # the tolerance is RoPE's, which both LLaDA and bgpo evaluate in fp32.
    ids = torch.randint(0, 127, (2, 11))
    torch.testing.assert_close(model.logits(ids), _reference_llada_logits(sd, config, ids), rtol=1e-5, atol=1e-5)

    as_bf16 = LLaDAModelLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in as_bf16.parameters()} == {torch.bfloat16}


def test_loading_errors_name_the_problem(tmp_path):
    config = LLaDAConfig.preset("tiny")
    sd = _original_state_dict(config)
    model = LLaDAModelLM(config)
    extra = tmp_path / "extra.safetensors"
    safetensors_torch.save_file({**sd, "model.transformer.wpe.weight": torch.zeros(4, 64)}, extra)
    with pytest.raises(ValueError, match="wpe"):
        load_llada_weights(model, extra)
    missing = tmp_path / "missing.safetensors"
    safetensors_torch.save_file({k: v for k, v in sd.items() if "blocks.1.up_proj" not in k}, missing)
    with pytest.raises(ValueError, match="blocks.1.mlp.up_proj.weight"):
        load_llada_weights(model, missing)
    wrong = tmp_path / "wrong.safetensors"
    safetensors_torch.save_file({**sd, "model.transformer.ln_f.weight": torch.ones(32)}, wrong)
    with pytest.raises(ValueError, match="shape"):
        load_llada_weights(model, wrong)
    with pytest.raises(FileNotFoundError):
        load_llada_weights(model, tmp_path / "nowhere")



def test_broken_checkpoint_files_are_named(tmp_path):
    config = LLaDAConfig.preset("tiny")
    model = LLaDAModelLM(config)
    safetensors_torch.save_file(_original_state_dict(config), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])  # a truncated download
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_llada_weights(model, tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    for content in ('{"metadata": {}}', "[1, 2]", "{not json", '{"weight_map": ["a"]}'):
        index.write_text(content)
        with pytest.raises(ValueError, match="model.safetensors.index.json is not a safetensors index"):
            load_llada_weights(model, tmp_path)
    index.write_text('{"weight_map": {"model.transformer.wte.weight": "../../etc/passwd"}}')
    with pytest.raises(ValueError, match="not a file name"):
        load_llada_weights(model, tmp_path)
    index.write_text('{"weight_map": {"model.transformer.wte.weight": "model-00002.safetensors"}}')
    with pytest.raises(FileNotFoundError, match="model-00002.safetensors is missing"):
        load_llada_weights(model, tmp_path)


# --------------------------------------------------------------------------- Hugging Face export
def test_exported_config_json_is_llada_8b_s_own():
    from bgpo.models.export import hf_config

    exported = hf_config(LLaDAConfig.preset("llada-8b"), "bfloat16")
    assert {key: exported.get(key) for key in LLADA_8B_CONFIG_JSON} == LLADA_8B_CONFIG_JSON
    assert LLaDAConfig.from_dict(exported) == LLaDAConfig.preset("llada-8b")


def test_export_round_trip_of_a_trainer_checkpoint(tmp_path, capsys):
    from safetensors import safe_open

    from bgpo.cli import main
    from bgpo.train import Trainer, load_config
    from bgpo.train.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    trainer = Trainer(load_config(None, [
        "model.tokenizer=char", "model.overrides={n_kv_heads: 2}", "data.prompt_template={puzzle}=",
        "data.train_size=8", "data.eval_size=0", "rollout.group_size=2", "rollout.gen_length=16",
        "rollout.block_length=16", "rollout.steps=4", "policy.num_samples=1", "batch_size=1", "steps=1",
        "sft.steps=0", "checkpoint.every=1", "log.progress=false", "log.tensorboard=false", f"output_dir={run}",
    ]))
    trainer.train()
    step = latest_checkpoint(run / "checkpoints")
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0  # the run's directory: its newest complete checkpoint
    assert "config.json" in capsys.readouterr().out

    exported = LLaDAModelLM.from_pretrained(out)
    assert exported.config == trainer.model.config
    ids = torch.randint(0, 128, (2, 24))
    torch.testing.assert_close(exported.logits(ids), trainer.model.logits(ids), rtol=0, atol=0)
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert names == set(llada_state_dict(trainer.model))
    assert all(n.startswith("model.transformer.") for n in names)
    assert "model.transformer.blocks.1.q_proj.weight" in names
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["architectures"] == ["LLaDAModelLM"] and config_json["n_kv_heads"] == 2

    assert main(["export", str(step), str(out)]) == 2  # never overwrites an export
    assert "exists" in capsys.readouterr().err
    from bgpo.models.export import export_hf

    half = export_hf(step, tmp_path / "bf16", dtype="bfloat16")
    assert {p.dtype for p in LLaDAModelLM.from_pretrained(half).parameters()} == {torch.bfloat16}

    # an export killed while writing the weights leaves no torn model.safetensors: a rerun goes through
    import safetensors.torch

    def killed(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(safetensors.torch, "save_file", killed)
        export_hf(step, tmp_path / "killed")
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    assert LLaDAModelLM.from_pretrained(export_hf(step, tmp_path / "killed")).config == trainer.model.config
    assert main(["export", str(tmp_path / "nothing-here"), str(tmp_path / "x")]) == 2
    assert "not a directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- Hugging Face adapter
def _bidirectional(model: nn.Module) -> nn.Module:
    """Turn a transformers decoder into a bidirectional mask predictor: full attention masks, no causal flag."""
    model.config.is_causal = False
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return model.eval()


def _hf_llama():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config.mask_token_id = 95
    torch.manual_seed(0)
    return _bidirectional(transformers.LlamaForCausalLM(config))


def _hf_qwen2():
    config = transformers.Qwen2Config(vocab_size=80, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                      tie_word_embeddings=True, eos_token_id=[78, 77])
    torch.manual_seed(1)
    return _bidirectional(transformers.Qwen2ForCausalLM(config))


class _Tokenizer:
    mask_token_id = 79
    eos_token_id = 77


@pytest.mark.parametrize("build, tokenizer", [(_hf_llama, None), (_hf_qwen2, _Tokenizer())])
def test_adapter_gives_hidden_states_and_head_without_logits(build, tokenizer):
    hf = build()
    adapter = HFMaskedDiffusionAdapter(hf, tokenizer=tokenizer)
    assert isinstance(adapter, MaskedDiffusionLM)
    assert adapter.blocks is hf.model.layers
    assert adapter.lm_head_weight is hf.lm_head.weight and adapter.lm_head_bias is None
    ids = torch.randint(0, 60, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    expected = hf(input_ids=ids, attention_mask=mask).logits
    hidden = adapter.hidden_states(ids, mask)
    assert hidden.shape == (2, 10, hf.config.hidden_size)
    torch.testing.assert_close(hidden @ adapter.lm_head_weight.T, expected)
    torch.testing.assert_close(adapter.logits(ids, mask), expected)
    assert hf.get_output_embeddings() is hf.lm_head  # the head is put back after the forward
    # Gradients reach the wrapped model's parameters through hidden states and head weight.
    (hidden @ adapter.lm_head_weight.T).sum().backward()
    assert hf.model.layers[0].self_attn.q_proj.weight.grad is not None and hf.lm_head.weight.grad is not None


def test_adapter_token_ids_from_config_tokenizer_or_arguments():
    llama = HFMaskedDiffusionAdapter(_hf_llama())
    assert (llama.mask_token_id, llama.eos_token_id) == (95, 2)
    qwen = HFMaskedDiffusionAdapter(_hf_qwen2(), tokenizer=_Tokenizer())
    assert (qwen.mask_token_id, qwen.eos_token_id) == (79, 78)  # config's first EOS wins over the tokenizer's
    explicit = HFMaskedDiffusionAdapter(_hf_qwen2(), mask_token_id=5, eos_token_id=None)
    assert explicit.mask_token_id == 5


def test_adapter_shift_for_ar_adapted_families():
    hf = _hf_llama()
    plain = HFMaskedDiffusionAdapter(hf)
    hf.config.model_type = "dream"  # Dream: the hidden state at t - 1 predicts token t, 4-D masks
    dream = HFMaskedDiffusionAdapter(hf)
    assert dream.shift and not plain.shift
    ids = torch.randint(0, 60, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    unshifted = plain.hidden_states(ids, mask)
    torch.testing.assert_close(dream.hidden_states(ids, mask), torch.cat((unshifted[:, :1], unshifted[:, :-1]), 1))


def test_adapter_refuses_models_it_cannot_drive():
    llama = _hf_llama()
    with pytest.raises(UnsupportedModelError, match="no LM head"):
        HFMaskedDiffusionAdapter(llama.model)  # the backbone without its head
    with pytest.raises(UnsupportedModelError, match="mask_token_id"):
        HFMaskedDiffusionAdapter(_hf_qwen2())

    class TiedFunctionally(nn.Module):  # LLaDA with weight_tying: the head is the embedding module
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

        def get_output_embeddings(self):
            return self.embed

    with pytest.raises(UnsupportedModelError, match="Embedding"):
        HFMaskedDiffusionAdapter(TiedFunctionally(), mask_token_id=9)


def test_adapter_from_pretrained(tmp_path):
    _hf_llama().save_pretrained(tmp_path)
    adapter = HFMaskedDiffusionAdapter.from_pretrained(tmp_path, mask_token_id=95)
    assert isinstance(adapter.model, transformers.LlamaForCausalLM) and adapter.mask_token_id == 95


# --------------------------------------------------------------------------- activation checkpointing
def _gradients_and_peak(model: nn.Module, run) -> tuple[dict[str, torch.Tensor], int]:
    model.zero_grad(set_to_none=True)
    with track_peak_memory("cpu") as memory:  # the CPU allocator's real allocations, via the profiler
        run().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, memory.peak_bytes


@pytest.mark.parametrize("kind", ["llada", "hf"])
def test_checkpointing_same_gradients_lower_peak_memory(kind):
    if kind == "llada":
        model = _tiny(n_layers=4).float()
    else:
        model = HFMaskedDiffusionAdapter(_hf_llama())
    ids = torch.randint(0, 90, (4, 96))
    target = torch.randn(4, 96, model.lm_head_weight.shape[1], generator=torch.Generator().manual_seed(0))

    def run():
        return (model.hidden_states(ids) * target).sum()

    names = [n for n, _ in model.named_parameters()]
    plain_grads, plain_peak = _gradients_and_peak(model, run)
    blocks = enable_activation_checkpointing(model)
    assert blocks is model.blocks
    ckpt_grads, ckpt_peak = _gradients_and_peak(model, run)
    backbone = [n for n, p in model.named_parameters() if p is not model.lm_head_weight]
    assert list(plain_grads) == list(ckpt_grads) == backbone
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], msg=name)
    assert ckpt_peak < 0.75 * plain_peak, (ckpt_peak, plain_peak)
    # Parameter names are unchanged, enabling twice is harmless, copies checkpoint their own blocks.
    assert [n for n, _ in model.named_parameters()] == names
    enable_activation_checkpointing(model)
    clone = copy.deepcopy(model)
    assert clone.blocks[0].forward.__self__ is clone.blocks[0]
    torch.testing.assert_close(clone.hidden_states(ids), model.hidden_states(ids))


def test_find_blocks_on_any_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2)])
            self.trunk = nn.Sequential(nn.Linear(2, 8), nn.ModuleList([nn.Linear(8, 8) for _ in range(3)]))

        def forward(self, x):
            x = self.trunk[0](x)
            for layer in self.trunk[1]:
                x = torch.tanh(layer(x))
            return x

    net = Net()
    assert find_blocks(net) is net.trunk[1]
    x = torch.randn(5, 2, requires_grad=True)
    expected = torch.autograd.grad(net(x).sum(), x)[0]
    enable_activation_checkpointing(net)
    torch.testing.assert_close(torch.autograd.grad(net(x).sum(), x)[0], expected)
    with pytest.raises(ValueError, match="model: Linear has no nn.ModuleList"):
        enable_activation_checkpointing(nn.Linear(2, 2))
