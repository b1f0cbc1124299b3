"""Every family trains as peft does: 20 AdamW steps from the same adapter init agree within 1e-4
relative; the checkpoint loads in peft with LEMA's logits; the merged model gives them too.

LoRA targets are LEMA's defaults (every projection of the dense families, Phi-3's fused
``qkv_proj`` / ``gate_up_proj`` by those names, the attention projections of the mixtures
of experts), handed to peft by name.
"""

from __future__ import annotations

import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.app.tools.merge import merge_adapter
from tests.family_models import FAMILIES, batch, files

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

STEPS = 20


def _hf(folder, name):
    attn = "eager" if name == "gemma2" else "sdpa"
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                             attn_implementation=attn).eval()


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("name", FAMILIES)
def test_adamw_steps_equal_peft_and_the_checkpoint_and_merge_give_the_same_model(root, tmp_path, name):
    folder, path = files(name, root)
    model = LemaModel(LemaConfig(gbi_path=str(path), device="cpu", lora_rank=4, lora_alpha=8, seed=3,
                                 max_grad_norm=None, batch_size=2, max_seq_len=12))
    model.initialize_lora()
    targets = sorted({key.split(".")[-1] for key in model.lora.layer(0)})
    reference = peft.get_peft_model(_hf(folder, name), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                        target_modules=targets))
    peft.set_peft_model_state_dict(reference, model.lora.state_dict_peft(model.spec))
    ours = torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2)
    theirs = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    trainer = model.get_trainer(ours)
    for step in range(STEPS):
        ids, mask = batch(10 + step, padded=step % 2 == 1)
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
        trainer.train_step(ids, labels=labels, attention_mask=mask)
        reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        theirs.step()
        theirs.zero_grad()
    expected = peft.get_peft_model_state_dict(reference)
    trained = model.lora.state_dict_peft(model.spec)
    assert trained.keys() == expected.keys()
    worst = max(_relative(trained[k], expected[k]) for k in trained)
    assert worst <= 1e-4, (name, worst)
    assert any(t.abs().max() > 0.01 for k, t in trained.items() if "lora_B" in k)  # the adapters really trained

    ids, mask = batch(99, padded=True)
    real = mask.bool()
    logits = model.forward(ids, attention_mask=mask)
    trainer.save_checkpoint(tmp_path / "ckpt")
    loaded = peft.PeftModel.from_pretrained(_hf(folder, name), str(tmp_path / "ckpt")).eval()
    with torch.no_grad():
        assert (loaded(input_ids=ids, attention_mask=mask).logits - logits)[real].abs().max() <= 1e-4
    merge_adapter(path, tmp_path / "ckpt", tmp_path / "merged", hf_folder=True)
    with torch.no_grad():
        merged = _hf(tmp_path / "merged", name)(input_ids=ids, attention_mask=mask).logits
    assert (merged - logits)[real].abs().max() <= 1e-4
    model.close()
