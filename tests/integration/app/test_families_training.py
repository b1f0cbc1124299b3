"""Every family trains as peft does: 20 AdamW steps from the same adapter init agree within the
tolerance rule (tests/tolerance.py: peft's own run on one thread instead of two gives the noise);
the checkpoint loads in peft with LEMA's logits; the merged model gives them too.

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
from tests.tolerance import assert_close, forward_floor, logits_noise, on_one_thread, relative_error

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

STEPS = 20


def _hf(folder, name):
    attn = "eager" if name == "gemma2" else "sdpa"
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                             attn_implementation=attn).eval()


def _peft_run(folder, name, targets, initial):
    """peft's adapters after STEPS AdamW steps from ``initial`` (the reference)."""
    reference = peft.get_peft_model(_hf(folder, name), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                        target_modules=targets))
    peft.set_peft_model_state_dict(reference, initial)
    theirs = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    for step in range(STEPS):
        ids, mask = _step_batch(step)
        reference(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask)).loss.backward()
        theirs.step()
        theirs.zero_grad()
    return peft.get_peft_model_state_dict(reference)


def _step_batch(step):
    return batch(10 + step, padded=step % 2 == 1)


def _labels(ids, mask):
    return ids if mask is None else ids.masked_fill(mask == 0, -100)


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
    initial = {k: v.clone() for k, v in model.lora.state_dict_peft(model.spec).items()}
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
    for step in range(STEPS):
        ids, mask = _step_batch(step)
        trainer.train_step(ids, labels=_labels(ids, mask), attention_mask=mask)
    expected = _peft_run(folder, name, targets, initial)
    again = on_one_thread(lambda: _peft_run(folder, name, targets, initial))  # peft against itself
    trained = model.lora.state_dict_peft(model.spec)
    assert trained.keys() == expected.keys()
    floor = forward_floor(model.spec, 12, extra=STEPS)  # each step's sums, chained through the steps
    for k in trained:
        assert_close(trained[k], expected[k], noise=relative_error(again[k], expected[k]), floor=floor,
                     what=(name, k))
    assert any(t.abs().max() > 0.01 for k, t in trained.items() if "lora_B" in k)  # the adapters really trained

    ids, mask = batch(99, padded=True)
    real = mask.bool()
    logits = model.logits(ids, attention_mask=mask)
    trainer.save_checkpoint(tmp_path / "ckpt")
    loaded = peft.PeftModel.from_pretrained(_hf(folder, name), str(tmp_path / "ckpt")).eval()
    floor = forward_floor(model.spec, ids.shape[1])
    with torch.no_grad():
        assert_close(loaded(input_ids=ids, attention_mask=mask).logits[real], logits[real],
                     noise=logits_noise(loaded, ids, mask, select=real), floor=floor, what=(name, "peft"))
    merge_adapter(path, tmp_path / "ckpt", tmp_path / "merged", hf_folder=True)
    with torch.no_grad():
        hf_merged = _hf(tmp_path / "merged", name)
        merged = hf_merged(input_ids=ids, attention_mask=mask).logits
    assert_close(merged[real], logits[real], noise=logits_noise(hf_merged, ids, mask, select=real), floor=floor,
                 what=(name, "merged"))
    model.close()
