"""LoRA state: targets, init, PEFT names and config, and gradients equal to PEFT's."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tiny_models import build_hf_model, spec_of, unit_weights  # noqa: E402
from tolerance import assert_close, forward_floor, logits_noise, order_noise  # noqa: E402

from lema.domain.model.blocks import decoder_block, embed  # noqa: E402
from lema.domain.model.context import make_context  # noqa: E402
from lema.domain.model.heads import head_loss, shift_labels  # noqa: E402
from lema.domain.model.lora import (  # noqa: E402
    LoraSpec,
    adapter_config,
    from_peft_state_dict,
    init_lora,
    module_keys,
    module_shape,
    resolve_targets,
)
from lema.errors import CheckpointError, ConfigError  # noqa: E402

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"]}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def kind(request):
    return request.param


def _peft_model(kind: str, seed: int = 0):
    model = build_hf_model(kind, seed=seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], lora_dropout=0.0,
                             fan_in_fan_out=kind == "gpt2", task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():  # PEFT zeroes B; random A and B make every gradient informative
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return pm


def test_lora_spec_scaling_and_validation():
    """scaling is alpha/r (alpha/sqrt(r) with rsLoRA); bad values name the field and value."""
    assert LoraSpec(rank=16, alpha=32).scaling == 2.0
    assert LoraSpec(rank=16, alpha=32, use_rslora=True).scaling == 8.0
    with pytest.raises(ConfigError, match="rank=0"):
        LoraSpec(rank=0)
    with pytest.raises(ConfigError, match="dropout=1.5"):
        LoraSpec(dropout=1.5)
    with pytest.raises(ConfigError, match="alpha=-1.0"):
        LoraSpec(alpha=-1)


def test_resolve_targets_defaults_aliases_and_errors():
    """None gives the defaults; short and qualified names are accepted; unknown names list the choices."""
    assert resolve_targets("llama", None) == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj")
    assert resolve_targets("gpt2", None) == ("c_attn",)
    assert resolve_targets("llama", ["self_attn.q_proj", "v_proj", "v_proj"]) == ("self_attn.q_proj", "v_proj")
    assert resolve_targets("gpt2", ["all-linear"]) == ("c_attn", "c_proj", "c_fc")
    with pytest.raises(ConfigError) as err:
        resolve_targets("llama", ["q_proj", "c_attn"])
    assert "['c_attn']" in str(err.value) and "gate_proj" in str(err.value)
    with pytest.raises(ConfigError, match="c_attn"):
        resolve_targets("gpt2", [])


def test_module_keys_and_shapes():
    """c_proj targets both GPT-2 projections; shapes read Conv1D as [in, out] and Linear as [out, in]."""
    gpt2 = spec_of(build_hf_model("gpt2"))
    assert module_keys(gpt2, ["c_proj"]) == ("attn.c_proj", "mlp.c_proj")
    assert module_keys(gpt2, ["mlp.c_proj"]) == ("mlp.c_proj",)
    assert module_shape(gpt2, "mlp.c_fc") == (64, 256)
    llama = spec_of(build_hf_model("llama"))
    assert module_shape(llama, "self_attn.k_proj") == (64, 32)
    assert module_shape(llama, "mlp.down_proj") == (96, 64)


def test_init_is_peft_kaiming_uniform_and_reproducible():
    """A is uniform within 1/sqrt(in), B is zero, fp32 leaves; a seed reproduces; layers differ."""
    spec = spec_of(build_hf_model("llama"))
    ls = LoraSpec(rank=8, alpha=16)
    a = init_lora(spec, ls, seed=5)
    b = init_lora(spec, ls, seed=5)
    c = init_lora(spec, ls, seed=6)
    for key, (A, B) in a.layer(0).items():
        fan_in, fan_out = module_shape(spec, key)
        assert A.shape == (8, fan_in) and B.shape == (fan_out, 8)
        assert A.dtype == B.dtype == torch.float32 and A.requires_grad and A.is_leaf
        assert A.abs().max() <= 1 / math.sqrt(fan_in) and A.abs().max() > 0.5 / math.sqrt(fan_in)
        assert not B.any()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.parameters()[0], c.parameters()[0])
    assert not torch.equal(a.layer(0)["self_attn.q_proj"][0], a.layer(1)["self_attn.q_proj"][0])
    assert len(a.parameters()) == spec.n_layers * 7 * 2
    assert a.named_parameters()[1][0] == "layers.0.self_attn.q_proj.lora_B"


def test_peft_key_round_trip(kind):
    """state_dict_peft -> from_peft_state_dict gives the same tensors; '.default.' names load too."""
    pm = _peft_model(kind)
    spec = spec_of(pm.base_model.model)
    ls = LoraSpec(rank=4, alpha=8, targets=TARGETS[kind])
    internal = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    assert any(".default." in k for k in internal)
    state = from_peft_state_dict(spec, ls, internal)
    saved = peft.get_peft_model_state_dict(pm)
    assert set(state.state_dict_peft(spec)) == set(saved)
    again = from_peft_state_dict(spec, ls, state.state_dict_peft(spec))
    for name, t in again.state_dict_peft(spec).items():
        assert torch.equal(t, saved[name])


def test_from_peft_state_dict_lists_every_problem():
    """Missing modules, wrong shapes and unexpected keys are reported together."""
    spec = spec_of(build_hf_model("llama"))
    ls = LoraSpec(rank=4, alpha=8, targets=["q_proj", "v_proj"])
    tensors = init_lora(spec, ls, seed=0).state_dict_peft(spec)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
    with pytest.raises(CheckpointError) as err:
        from_peft_state_dict(spec, ls, tensors)
    msg = str(err.value)
    assert "layers.1.self_attn.v_proj.lora_B.weight" in msg and "1 missing" in msg
    assert "shape [8, 64], expected [4, 64]" in msg
    assert "1 unexpected" in msg and "mlp.up_proj" in msg


def test_lora_gradients_and_loss_equal_peft(kind):
    """Embed, blocks and chunked loss with our adapters give PEFT's loss and LoRA gradients."""
    pm = _peft_model(kind, seed=1)
    spec = spec_of(pm.base_model.model)
    base = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
            for k, v in pm.state_dict().items() if "lora_" not in k}
    units = unit_weights(spec, base)
    ls = LoraSpec(rank=4, alpha=8, targets=TARGETS[kind])
    state = from_peft_state_dict(spec, ls, peft.get_peft_model_state_dict(pm))
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, spec.vocab_size, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2] = -100

    def reference():
        pm.zero_grad()
        out = pm(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n.replace(".default", ""): p.grad.clone() for n, p in pm.named_parameters() if "lora_" in n}
        return out.loss.detach(), grads

    out_loss, expected = reference()
    noise = {name: order_noise(lambda name=name: reference()[1][name], baseline=g) for name, g in expected.items()}
    loss_noise = order_noise(lambda: reference()[0], baseline=out_loss)
    floor = forward_floor(spec, ids.shape[1], extra=spec.n_layers + 1)  # forward, then back through every layer

    ctx = make_context(spec, tuple(ids.shape), attention_mask=mask, lora=ls)
    x = embed(spec, units[0], ids, ctx)
    for i in range(spec.n_layers):
        x = decoder_block(spec, units[i + 1], state.layer(i), x, ctx, layer=i)
    loss_sum, n = head_loss(spec, units[-1], x, shift_labels(labels), chunk_tokens=6)
    (loss_sum / n).backward()

    assert_close(loss_sum / n, out_loss, noise=loss_noise, floor=floor, what="loss")
    ours = dict(zip(state.state_dict_peft(spec), state.parameters()))
    assert set(ours) == set(expected)
    for name, p in ours.items():
        assert_close(p.grad, expected[name], noise=noise[name], floor=floor, what=name)


def test_adapter_config_is_what_peft_reads(kind, tmp_path):
    """Our adapter_config builds a LoraConfig, and PeftModel.from_pretrained loads our adapter."""
    from safetensors.torch import save_file

    pm = _peft_model(kind, seed=2)
    spec = spec_of(pm.base_model.model)
    ls = LoraSpec(rank=4, alpha=8, targets=TARGETS[kind])
    cfg = adapter_config(spec, ls, "tiny-" + kind)
    config = peft.LoraConfig(**{k: v for k, v in cfg.items() if k in peft.LoraConfig.__dataclass_fields__})
    assert config.r == 4 and config.lora_alpha == 8 and config.fan_in_fan_out == (kind == "gpt2")
    assert set(config.target_modules) == set(TARGETS[kind])

    pm.save_pretrained(tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "fan_in_fan_out", "bias", "use_rslora", "task_type", "peft_type", "lora_dropout"):
        assert cfg[key] == written[key], key
    assert cfg["target_modules"] == sorted(written["target_modules"])

    state = from_peft_state_dict(spec, ls, peft.get_peft_model_state_dict(pm))
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.state_dict_peft(spec).items()},
              str(tmp_path / "ours" / "adapter_model.safetensors"))
    loaded = peft.PeftModel.from_pretrained(build_hf_model(kind, seed=2), str(tmp_path / "ours"))
    ids = torch.randint(0, spec.vocab_size, (1, 8))
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, noise=logits_noise(pm, ids),
                     floor=forward_floor(spec, ids.shape[1]))
    assert LoraSpec.from_adapter_config(cfg) == LoraSpec(rank=4, alpha=8, targets=sorted(TARGETS[kind]))


def test_lora_dropout_masks_repeat_on_recompute():
    """With dropout in training, recomputing a block with the same context gives the same output."""
    spec = spec_of(build_hf_model("llama"))
    model = build_hf_model("llama")
    units = unit_weights(spec, model.state_dict())
    ls = LoraSpec(rank=4, alpha=8, dropout=0.5)
    state = init_lora(spec, ls, seed=0)
    with torch.no_grad():
        for p in state.parameters():
            p.normal_()
    x = torch.randn(1, 6, spec.hidden_size)
    ctx = make_context(spec, (1, 6), lora=ls, training=True, dropout_seed=123)
    first = decoder_block(spec, units[1], state.layer(0), x, ctx, layer=0)
    again = decoder_block(spec, units[1], state.layer(0), x, ctx, layer=0)
    other = decoder_block(spec, units[1], state.layer(0), x, make_context(spec, (1, 6), lora=ls, training=True,
                                                                            dropout_seed=124), layer=0)
    evald = decoder_block(spec, units[1], state.layer(0), x, make_context(spec, (1, 6), lora=ls), layer=0)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other) and not torch.allclose(first, evald)
