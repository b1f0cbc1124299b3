"""How far tiled training's adapters are from whole-layer training's after 3 AdamW steps.

The model, data and budget of ``tests/integration/app/test_long_context.py`` (Llama hidden
64, 4 layers, fp32, batch 1 x 2048, LoRA rank 8 on all projections); tiles and offload
chosen by the planner for the budget. Prints, for the learning rate given, the relative
norm difference of all adapters and of their updates (adapters minus init), and the same
for the whole-layer run on one CPU thread against two (the noise of summing in another
order). ``python -m benchmarks.tiled_adamw_accuracy --lr 2e-4`` (or ``1e-2``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import tests.integration.app.test_long_context as t
from tests.model_files import save_monolithic


def _model_file(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=t.HIDDEN, intermediate_size=172, num_hidden_layers=t.LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)
    return save_monolithic(LlamaForCausalLM(cfg), folder / "m.safetensors")


def _train(path: Path, lr: float, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    model = t._model(path, overrides.pop("capacity", None), **overrides)
    init = torch.cat([p.detach().flatten() for p in model.get_trainable_parameters()])
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=lr))
    for i in range(3):
        trainer.train_step(t._batch(i))
    return init, torch.cat([p.detach().flatten() for p in model.get_trainable_parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=2e-4)
    lr = parser.parse_args().lr
    with tempfile.TemporaryDirectory() as folder:
        path = _model_file(Path(folder))
        init, whole = _train(path, lr, offload_activations=False)
        _, tiled = _train(path, lr, capacity=t.BUDGET, vram_budget=t.BUDGET)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        _, one_thread = _train(path, lr, offload_activations=False)
        torch.set_num_threads(threads)
    for name, other in ((f"tiled+offload vs whole ({threads} threads)", tiled),
                        (f"whole on 1 thread vs {threads}", one_thread)):
        print(f"lr {lr:g}  {name}: adapters {float((other - whole).norm() / whole.norm()):.2e}, "
              f"updates {float((other - whole).norm() / (whole - init).norm()):.2e}")


if __name__ == "__main__":
    main()
