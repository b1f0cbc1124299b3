"""Packed batches through LemaModel and LemaTrainer: the same logits, loss and adapter
update as the examples padded into a batch, and transformers' logits per example."""

from __future__ import annotations

import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.data.packing import PackedRow, collate_packed
from lema.data.examples import collate
from lema.data.store import StoreBuilder
from tests.model_files import save_monolithic
from tests.tiny_models import build_hf_model
from tests.tolerance import assert_close, forward_floor, logits_noise

LENGTHS = (6, 9, 5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = build_hf_model("llama", seed=4)
    path = save_monolithic(model, tmp_path_factory.mktemp("packed") / "model.safetensors")
    gen = torch.Generator().manual_seed(9)
    builder = StoreBuilder()
    for n in LENGTHS:
        ids = torch.randint(0, 128, (n,), generator=gen).tolist()
        builder.add(ids, [0, 0] + [1] * (n - 2))  # the first two tokens off the loss, like a prompt
    return model, path, builder.build()


def _model(path) -> LemaModel:
    model = LemaModel(LemaConfig(gbi_path=str(path), device="cpu", lora_rank=4, seed=1, batch_size=3,
                                 max_seq_len=sum(LENGTHS)))
    model.initialize_lora()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a non-zero B, so the adapters change the logits
        for p in model.get_trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_packed_forward_gives_transformers_logits_of_each_example(reference):
    hf, path, store = reference
    model = _model(path)
    model.lora = None  # the base alone, as transformers has it
    batch = collate_packed([PackedRow(store, (0, 1, 2))], pad_id=0)
    assert batch["position_ids"][0].tolist() == [*range(6), *range(9), *range(5)]
    logits = model.logits(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    start = 0
    with torch.no_grad():
        for i, n in enumerate(LENGTHS):
            ids = torch.tensor([store[i].input_ids])
            alone = hf(input_ids=ids).logits[0]
            assert_close(logits[0, start:start + n], alone, noise=logits_noise(hf, ids),
                         floor=forward_floor(model.spec, sum(LENGTHS)))
            start += n


def test_packed_loss_and_update_equal_the_padded_batch(reference):
    _, path, store = reference
    packed = collate_packed([PackedRow(store, (0, 1, 2))], pad_id=0)
    padded = collate([store[i] for i in range(3)], pad_id=0)
    model = _model(path)
    loss_packed, n_packed = model.loss(packed["input_ids"], packed["labels"], packed["attention_mask"],
                                       packed["position_ids"])
    loss_padded, n_padded = model.loss(padded["input_ids"], padded["labels"], padded["attention_mask"])
    assert n_packed == n_padded == sum(n - 2 for n in LENGTHS)  # every label is predicted once
    floor = forward_floor(model.spec, sum(LENGTHS), extra=1)  # the packed row sums over all three examples
    assert_close(torch.as_tensor(loss_packed), torch.as_tensor(loss_padded), floor=floor, what="loss")

    adapters = []
    for batch in (packed, padded):
        model = _model(path)
        trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.1))
        trainer.train_step(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                           position_ids=batch.get("position_ids"))
        adapters.append([p.detach().clone() for p in model.get_trainable_parameters()])
    for a, b in zip(*adapters):
        assert_close(a, b, floor=floor)
