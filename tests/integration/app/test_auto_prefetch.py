"""AUTO chooses the prefetch depth by predicted step time (issue 27): the config's default
("auto") is told from a number, a number is kept, and the engine runs the depth the plan
chose, with the adapters of a run at today's depth (bit for bit on one thread: the depth
changes when weights arrive, not what is computed)."""

from __future__ import annotations

import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.adapters.devices.cpu import CpuDevice
from lema.app import bootstrap
from lema.errors import ConfigError
from tests.model_files import save_monolithic
from tests.tolerance import on_one_thread

SHAPE = dict(batch_size=2, max_seq_len=64, lora_rank=4)
LINK = 2e8  # a slow simulated link: the step is link-bound


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=6,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        max_position_embeddings=256))


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    return save_monolithic(_llama(), tmp_path_factory.mktemp("prefetch") / "m.safetensors")


def _config(path, **overrides) -> LemaConfig:
    return LemaConfig(**{**dict(gbi_path=str(path), device="cpu", seed=3, strategy="auto", **SHAPE), **overrides})


def _device(budget: int) -> CpuDevice:
    return CpuDevice(capacity=budget, link_bandwidth=LINK, direct_reads=True)


def _budget_choosing_another_depth(path) -> tuple[int, int]:
    """A device budget at which AUTO, on the slow link, reads ahead another depth than 2 where 2 fits too."""
    spec = LemaModel(_config(path, strategy="streaming")).spec
    for quarter_mib in range(4, 64):
        budget = quarter_mib * 2**18
        p = bootstrap.make_plan(_config(path, vram_budget=budget), spec, _device(budget))
        today = bootstrap.make_plan(_config(path, vram_budget=budget, prefetch_distance=2), spec, _device(budget))
        if p.fits and today.fits and p.streamed_units and p.shape.prefetch != 2:
            return budget, p.shape.prefetch
    raise AssertionError("no budget makes AUTO choose another depth")


def _train(config: LemaConfig, steps: int = 2) -> tuple[list[torch.Tensor], LemaModel]:
    model = LemaModel(config, device=_device(config.vram_bytes))
    model.initialize_lora()
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
    for i in range(steps):
        ids = torch.randint(0, 256, (SHAPE["batch_size"], SHAPE["max_seq_len"]),
                            generator=torch.Generator().manual_seed(i))
        trainer.train_step(ids)
    params = [p.detach().clone() for p in model.get_trainable_parameters()]
    model.close()
    return params, model


def test_the_engine_runs_the_depth_auto_chose_with_the_adapters_of_todays_depth(llama_file):
    budget, depth = _budget_choosing_another_depth(llama_file)
    params, model = on_one_thread(lambda: _train(_config(llama_file, vram_budget=budget)))
    assert model.plan().shape.prefetch == depth and model.engine.prefetch == depth
    assert model.plan().slot_count == min(depth + 1, len(model.plan().streamed_units))
    assert any(c.startswith(f"prefetch {depth} (") and "other depths" in c for c in model.plan().choices)
    reference, fixed = on_one_thread(lambda: _train(_config(llama_file, vram_budget=budget, prefetch_distance=2,
                                                            gradient_checkpointing=True)))
    assert fixed.engine.prefetch == 2
    for a, b in zip(reference, params):
        assert torch.equal(a, b)


def test_a_prefetch_the_user_names_is_kept(llama_file):
    budget, depth = _budget_choosing_another_depth(llama_file)
    spec = LemaModel(_config(llama_file, strategy="streaming")).spec
    for named in (0, 2, 4):
        config = _config(llama_file, vram_budget=budget, prefetch_distance=named)
        assert not config.prefetch_auto
        p = bootstrap.make_plan(config, spec, _device(budget))
        assert p.shape.prefetch == named and not any(c.startswith("prefetch ") for c in p.choices)
    # "auto" under another strategy is today's default, 2
    streaming = _config(llama_file, strategy="streaming", vram_budget=budget)
    assert streaming.prefetch_distance == "auto" and streaming.prefetch == 2 and not streaming.prefetch_auto
    assert bootstrap.make_plan(streaming, spec, _device(budget)).shape.prefetch == 2


@pytest.mark.parametrize("bad", [-1, "deep", 1.5, True])
def test_a_bad_prefetch_is_refused_naming_the_choices(llama_file, bad):
    with pytest.raises(ConfigError, match="prefetch_distance: .* must be an integer >= 0 or 'auto'"):
        _config(llama_file, prefetch_distance=bad)
