"""A quantized base moves and holds a fraction of the bytes, and its plan matches the measured peak.

Bytes come from the engine's own report (what each training step fetched) and the RAM
source's size; the 16-bit reference is the same model before transformers quantized it.
"""

from __future__ import annotations

import pytest
import torch

from lema import LemaConfig, LemaModel, MemoryStrategy
from lema.adapters.devices.cpu import CpuDevice
from tests.quant_models import quantized_folder

pytest.importorskip("bitsandbytes")
TOLERANCE = 0.10


def _llama(h: int, ff: int, layers: int, vocab: int, heads: int = 4, kv: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                        max_position_embeddings=256))


def _step(folder, **config) -> LemaModel:
    # The CPU standing in for a GPU: every weight is uploaded into a slot (not computed in place)
    model = LemaModel(LemaConfig(model_name_or_path=str(folder), device="cpu", lora_rank=4, batch_size=1,
                                 max_seq_len=16, **config), device=CpuDevice(direct_reads=True))
    model.initialize_lora()
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
    trainer.train_step(torch.randint(0, model.spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)))
    return model


@pytest.fixture(scope="module")
def bf16_and_nf4(tmp_path_factory):
    """A bf16 Llama whose layers dominate its bytes (as in real models), and its NF4 version."""
    root = tmp_path_factory.mktemp("ratio")
    nf4 = quantized_folder("llama", "nf4_dq", root, dtype=torch.bfloat16, model=_llama(128, 344, 4, 128))
    return root / "dense", nf4


def test_nf4_uploads_at_most_035_of_the_bf16_bytes_per_step(bf16_and_nf4):
    dense, nf4 = bf16_and_nf4
    with _step(dense) as a, _step(nf4) as b:
        assert a.spec.dtype == b.spec.dtype == "BF16" and b.spec.quantization is not None
        ratio = b.last_report.bytes_uploaded / a.last_report.bytes_uploaded
        assert b.last_report.n_fetches == a.last_report.n_fetches
        # each layer is dequantized once per fetch: the last one is computed twice in a row at the turn
        assert b.engine.dequantizer.dequantized == 2 * b.spec.n_layers - 1 and a.engine.dequantizer is None
        # The plan counts stored bytes; a slot aligns each tensor to 64 bytes (the small
        # quantization states are not multiples of 64).
        padding = 64 * b.last_report.n_fetches * max(len(u.tensors) for u in b.spec.units)
        assert 0 <= b.last_report.bytes_uploaded - b.plan().transfer_bytes_per_step <= padding
    print(f"bytes per step nf4/bf16 = {ratio:.3f}")
    assert ratio <= 0.35


def test_resident_holds_at_most_035_of_the_bf16_host_ram(bf16_and_nf4):
    dense, nf4 = bf16_and_nf4
    with _step(dense, strategy=MemoryStrategy.RESIDENT) as a, _step(nf4, strategy=MemoryStrategy.RESIDENT) as b:
        ratio = b.source.nbytes / a.source.nbytes
        assert b.source.nbytes <= b.plan().host_total + b.spec.embed_unit.nbytes
    print(f"RESIDENT host bytes nf4/bf16 = {ratio:.3f}")
    assert ratio <= 0.35


CASES = {
    # id: (variant, dtype, model builder, config)
    "nf4dq-f32": ("nf4_dq", torch.float32, lambda: _llama(128, 344, 4, 256),
                  dict(batch_size=2, max_seq_len=64, lora_rank=8, prefetch_distance=1)),
    "int8-f32": ("int8", torch.float32, lambda: _llama(128, 344, 4, 256),
                 dict(batch_size=2, max_seq_len=64, lora_rank=8, prefetch_distance=1)),
    "nf4-bf16": ("nf4", torch.bfloat16, lambda: _llama(256, 688, 3, 512),
                 dict(batch_size=1, max_seq_len=32, lora_rank=8, prefetch_distance=2)),
    # Large weights, few tokens: dequantizing the largest weight sets the peak.
    "fp4dq-dequant-peak": ("fp4_dq", torch.float32, lambda: _llama(256, 2048, 2, 128),
                           dict(batch_size=1, max_seq_len=4, lora_rank=2, prefetch_distance=0)),
    "nf4dq-bf16-auto": ("nf4_dq", torch.bfloat16, lambda: _llama(256, 688, 3, 512),
                        dict(batch_size=2, max_seq_len=128, lora_rank=8, prefetch_distance=1, strategy="auto",
                             vram_budget="12M")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_peak_of_a_quantized_model_matches_the_plan(tmp_path, case):
    variant, dtype, build, config = CASES[case]
    folder = quantized_folder("llama", variant, tmp_path, dtype=dtype, model=build())
    model = LemaModel(LemaConfig(model_name_or_path=str(folder), device="cpu", **config),
                      device=CpuDevice(count_compute=True))
    planned = model.plan().device_total
    assert model.plan().item("dequant_scratch").bytes > 0
    model.initialize_lora()
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
    ids = torch.randint(0, model.spec.vocab_size, (config["batch_size"], config["max_seq_len"]))
    peak = 0
    for _ in range(3):
        model.device.reset_peak()
        trainer.train_step(ids)
        peak = max(peak, model.device.peak_bytes())
    if case == "fp4dq-dequant-peak":
        assert "peak: dequantize" in model.plan().item("activation_peak").note
    model.close()
    print(f"peak {peak} plan {planned} ratio {peak / planned:.3f}")
    assert abs(peak - planned) / planned <= TOLERANCE, (peak, planned, peak / planned)
