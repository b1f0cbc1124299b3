"""The engine's equivalences on the late device (issue 23): a missing wait gives a wrong number.

:class:`~lema.adapters.devices.late_cpu.LateCpuDevice` completes every transfer on a worker
thread after a random delay, holds poison (NaN) in a destination until its ticket completes,
poisons a slot the moment it is released, and runs uploads and downloads on separate links.
Each test trains or generates the same thing on the plain CPU device standing in for a GPU
(the same traits, so the same plan and the same operations) and on the late device, and asks
for bit-identical numbers; the last ones plant a missing wait and see it caught.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lema import LemaConfig, LemaModel, MemoryStrategy
from lema.adapters.devices.cpu import CpuDevice
from lema.adapters.devices.late_cpu import LateCpuDevice, LateTicket
from lema.app.runtime.engine import Engine
from lema.app.runtime.offload import InputOffloader
from tests.model_files import save_monolithic
from tests.tiny_models import build_hf_model

pytestmark = pytest.mark.late

SEQ = 12


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    return save_monolithic(build_hf_model("llama", seed=1), tmp_path_factory.mktemp("late") / "model.safetensors")


def _batch(seed: int, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _adapters(path, device, steps: int = 2, seq: int = SEQ, **overrides) -> list[torch.Tensor]:
    cfg = dict(gbi_path=str(path), device="cpu", lora_rank=4, lora_dropout=0.0, seed=3, batch_size=2,
               max_seq_len=seq)
    cfg.update(overrides)
    with LemaModel(LemaConfig(**cfg), device=device) as model:
        model.initialize_lora()
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
        for i in range(steps):
            trainer.train_step(_batch(i, seq=seq))
        return [p.detach().clone() for p in model.get_trainable_parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference(llama_file):
    """Adapters trained on the plain CPU device standing in for a GPU (slots, staging)."""
    return _adapters(llama_file, CpuDevice(), strategy=MemoryStrategy.RESIDENT)


@pytest.mark.parametrize("strategy,prefetch", [(MemoryStrategy.STREAMING, 0), (MemoryStrategy.STREAMING, 1),
                                               (MemoryStrategy.STREAMING, 3), (MemoryStrategy.RESIDENT, 2),
                                               (MemoryStrategy.AUTO, 1)])
def test_every_strategy_and_prefetch_depth_trains_the_same_adapters_on_the_late_device(llama_file, reference,
                                                                                        strategy, prefetch):
    device = LateCpuDevice(seed=prefetch)
    params = _adapters(llama_file, device, strategy=strategy, prefetch_distance=prefetch)
    assert _same(reference, params), (strategy, prefetch)
    assert device.uploads > 0 and device.blocking_waits > 0  # the transfers were late, and waited for


def test_auto_with_room_for_half_the_layers_trains_the_same_adapters_on_the_late_device(llama_file, reference):
    with LemaModel(LemaConfig(gbi_path=str(llama_file), device="cpu", lora_rank=4, batch_size=2, max_seq_len=SEQ,
                              prefetch_distance=0), device=CpuDevice()) as probe:
        budget = probe.plan().device_total + probe.spec.largest_layer_bytes
    device = LateCpuDevice(seed=7, capacity=budget)
    params = _adapters(llama_file, device, strategy=MemoryStrategy.AUTO, prefetch_distance=0, vram_budget=budget)
    assert _same(reference, params)


def test_pinned_resident_uploads_train_the_same_adapters_on_the_late_device(llama_file, reference):
    device = LateCpuDevice(seed=3, pinned_host=True)
    assert _same(reference, _adapters(llama_file, device, strategy=MemoryStrategy.RESIDENT))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_offloaded_and_tiled_layers_train_the_same_adapters_on_the_late_device(tmp_path, prefetch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024)
    path = save_monolithic(LlamaForCausalLM(cfg), tmp_path / "m.safetensors")
    seq = 512
    common = dict(seq=seq, prefetch_distance=prefetch, steps=2)
    whole = _adapters(path, CpuDevice(), offload_activations=False, **common)
    offloaded = _adapters(path, CpuDevice(), offload_activations=True, **common)
    late = LateCpuDevice(seed=11)
    assert _same(offloaded, _adapters(path, late, offload_activations=True, **common))
    assert late.downloads > 0  # inputs went to the host and back
    assert _same(whole, offloaded)  # (offload alone changes no number)
    # a budget small enough that the planner tiles the layers and offloads their inputs
    with LemaModel(LemaConfig(gbi_path=str(path), device="cpu", lora_rank=4, batch_size=2, max_seq_len=seq,
                              prefetch_distance=prefetch, offload_activations=False), device=CpuDevice()) as probe:
        budget = int(probe.plan().device_total * 0.6)
    room = int(budget * 1.2)  # the device's capacity: the plan for `budget`, and slack for its error
    tiled = _adapters(path, CpuDevice(capacity=room), vram_budget=budget, **common)
    late = LateCpuDevice(seed=12, capacity=room)
    with LemaModel(LemaConfig(gbi_path=str(path), device="cpu", lora_rank=4, batch_size=2, max_seq_len=seq,
                              prefetch_distance=prefetch, vram_budget=budget), device=CpuDevice(capacity=budget)) as m:
        plan = m.plan()
    assert plan.tile_tokens and plan.offload_activations, plan
    assert _same(tiled, _adapters(path, late, vram_budget=budget, **common))


def test_a_quantized_base_trains_the_same_adapters_on_the_late_device(quantized_model):
    pytest.importorskip("bitsandbytes")
    folder = quantized_model("llama", "nf4_dq")

    def train(device, **overrides) -> list[torch.Tensor]:
        cfg = dict(model_name_or_path=str(folder), device="cpu", lora_rank=4, lora_dropout=0.0, batch_size=2,
                   max_seq_len=SEQ, seed=5)
        cfg.update(overrides)
        with LemaModel(LemaConfig(**cfg), device=device) as model:
            model.initialize_lora()
            trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
            for step in range(2):
                trainer.train_step(_batch(step))
            return [p.detach().clone() for p in model.get_trainable_parameters()]

    reference = train(CpuDevice(), strategy=MemoryStrategy.RESIDENT)
    for seed, prefetch in ((1, 0), (2, 2)):
        assert _same(reference, train(LateCpuDevice(seed=seed), prefetch_distance=prefetch)), prefetch


def test_generation_gives_the_same_tokens_on_the_late_device(llama_file):
    from lema.app.tools.generation import generate

    prompts = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))

    def tokens(device) -> torch.Tensor:
        with LemaModel(LemaConfig(gbi_path=str(llama_file), device="cpu", lora_rank=4, prefetch_distance=1),
                       device=device) as model:
            model.initialize_lora(seed=1)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in model.get_trainable_parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            return generate(model, prompts, max_new_tokens=6)

    assert torch.equal(tokens(CpuDevice()), tokens(LateCpuDevice(seed=5)))


@pytest.mark.slow
def test_two_gloo_ranks_train_the_same_on_the_late_device(tmp_path):
    model = save_monolithic(build_hf_model("llama", seed=1), tmp_path / "model.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    worker = Path(__file__).resolve().parents[2] / "data_parallel_run.py"
    env = dict(os.environ, LEMA_TEST_DEVICE="late")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(worker),
                          str(model), str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    import json

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(rank["device"] == "LateCpuDevice" for rank in ranks)
    # the same two ranks on the plain device: the same numbers, bit for bit (same rows, same sums)
    plain = tmp_path / "plain"
    plain.mkdir()
    env["LEMA_TEST_DEVICE"] = "cpu"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(worker),
                          str(model), str(plain)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    for r, rank in enumerate(ranks):
        other = json.loads((plain / f"rank{r}.json").read_text())
        assert other["device"] == "CpuDevice"
        assert rank["losses"] == other["losses"] and rank["eval"] == other["eval"]
        assert rank["bad_ids"] == other["bad_ids"] and rank["out_of_memory"]["type"] == other["out_of_memory"]["type"]


# -- a planted missing wait is caught --------------------------------------------------------------


class _ForgetfulDevice(LateCpuDevice):
    """A late device whose ``forget``-th upload ticket does not wait (an engine that forgot one)."""

    def __init__(self, forget: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.forget = forget

    def delay(self, direction: str, label: object) -> float:
        return 0.3 if direction == "up" and self.uploads == self.forget else super().delay(direction, label)

    def _ticket(self) -> LateTicket:
        ticket = super()._ticket()
        if self.uploads + 1 == self.forget:  # (counted once the ticket is made)
            ticket.wait = lambda: None  # type: ignore[method-assign]
        return ticket


@pytest.mark.parametrize("forget", [1, 4])
def test_a_missing_wait_for_an_upload_gives_a_wrong_number(llama_file, reference, forget):
    from lema.errors import NonFiniteLossError

    device = _ForgetfulDevice(forget=forget, seed=0)
    # the slot's poison reaches the loss: the trainer refuses the step
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        _adapters(llama_file, device, strategy=MemoryStrategy.STREAMING, prefetch_distance=1)


class _SlowInputUploads(LateCpuDevice):
    slow = 0.2

    def delay(self, direction: str, label: object) -> float:
        return self.slow if direction == "up" and isinstance(label, tuple) else super().delay(direction, label)


class _SlowInputDownloads(LateCpuDevice):
    slow = 0.3

    def delay(self, direction: str, label: object) -> float:
        return self.slow if direction == "down" else super().delay(direction, label)


def _offload_pass(tmp_path, offloader_cls, device_cls=_SlowInputUploads, slow: float = 0.2) -> list[torch.Tensor]:
    """The inputs a toy pass gets back before each backward, through ``device_cls`` (a late
    device with some transfers slow), with ``offloader_cls`` moving them."""
    from lema.adapters.weights.resident_source import ResidentSource
    from lema.domain.schedule.layer_schedule import Phase
    from tests.stream_models import write_model

    layers = 4
    spec, _, state = write_model(tmp_path / "m", layers=layers)
    device = device_cls(seed=2)
    device.slow = slow  # seconds the slow transfers take: longer than the pass between fetch and use
    store = _Store()
    with Engine(spec, ResidentSource.from_state_dict(spec, state), device, prefetch=1, offload_inputs=True) as engine:
        engine._inputs = offloader_cls(device)

        def compute(phase, unit, weights):
            if 1 <= unit <= layers:
                if phase is Phase.FORWARD:
                    store.saved[unit] = torch.full((3, 100), float(unit))
                else:
                    store.back.append(store.saved.pop(unit).clone())

        engine.run(compute, backward_units=range(1, layers + 1), inputs=store)
    return store.back


class _Store:
    def __init__(self) -> None:
        self.saved: dict[int, torch.Tensor] = {}
        self.back: list[torch.Tensor] = []

    def take_input(self, unit: int) -> torch.Tensor:
        return self.saved.pop(unit)

    def give_input(self, unit: int, x: torch.Tensor) -> None:
        self.saved[unit] = x


def test_a_missing_wait_for_an_offloaded_input_gives_a_wrong_number(tmp_path):
    class NoWaitOffloader(InputOffloader):
        def hand_back(self, unit, inputs):
            restored = self._restoring.pop(unit, None)
            if restored is None or inputs is None:
                return None
            buffer, _, shape, dtype = restored  # the upload's ticket is dropped, never waited for
            inputs.give_input(unit, buffer.view(dtype).view(shape))
            return buffer

    good = _offload_pass(tmp_path / "good", InputOffloader)
    assert good and all(torch.isfinite(x).all() for x in good)
    assert all(torch.equal(x, torch.full((3, 100), x[0, 0].item())) for x in good)
    bad = _offload_pass(tmp_path / "bad", NoWaitOffloader, slow=5.0)
    assert any(not torch.isfinite(x).all() for x in bad)


def test_an_offloaded_input_goes_back_up_only_after_its_download_has_landed(tmp_path):
    """Downloads run beside uploads (a link each way): the upload of an input back to the
    device reads its host buffer only after the download into it has finished."""
    back = _offload_pass(tmp_path, InputOffloader, _SlowInputDownloads, slow=1.0)
    assert back and all(torch.equal(x, torch.full((3, 100), x[0, 0].item())) for x in back)
    assert sorted(float(x[0, 0]) for x in back) == [1.0, 2.0, 3.0, 4.0]


# -- host reads on the hot path ------------------------------------------------------------------


def test_a_training_pass_never_reads_the_device_from_the_host(llama_file):
    """``.item()``, ``float()``, ``int()``, ``bool()`` of a device tensor make the host wait for the
    GPU (``aten._local_scalar_dense``). Inside a pass there is none: the loss is read after the
    pass, not at the turn, and the objective's token count is the prepared batch's, counted on
    the host before the upload (``heads.head_loss`` read it from the device targets before)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self, device) -> None:
            super().__init__()
            self.device, self.count = device, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and self.device.in_pass:
                self.count += 1
            return func(*args, **(kwargs or {}))

    class PassMarkingDevice(CpuDevice):
        """The plain CPU device, marking the engine's pass (it resets the peak at the start
        and reads it at the end)."""

        in_pass = False

        def reset_peak(self) -> None:
            super().reset_peak()
            self.in_pass = True

        def peak_bytes(self) -> int:
            self.in_pass = False
            return super().peak_bytes()

    device = PassMarkingDevice()
    with LemaModel(LemaConfig(gbi_path=str(llama_file), device="cpu", lora_rank=4, batch_size=2, max_seq_len=SEQ),
                   device=device) as model:
        model.initialize_lora()
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
        trainer.train_step(_batch(0))
        reads = Reads(device)
        with reads:
            _, loss = trainer.train_step(_batch(1))
    assert isinstance(loss, float)
    assert reads.count == 0, reads.count


def test_offloaded_inputs_in_flight_stay_within_the_two_the_plan_counts(tmp_path):
    """A device keeps an offloaded input's memory until its download has read it: downloads
    that fall behind the forward must not pile up inputs on the device beyond the plan's two."""
    from lema.adapters.weights.resident_source import ResidentSource
    from lema.domain.schedule.layer_schedule import Phase
    from tests.stream_models import write_model

    class SlowDownloads(LateCpuDevice):
        in_flight: list = []
        most = 0

        def delay(self, direction: str, label: object) -> float:
            return 0.3 if direction == "down" else super().delay(direction, label)

        def download(self, device, host, nbytes, label=None):
            ticket = super().download(device, host, nbytes, label)
            self.in_flight = [t for t in self.in_flight if not t.done()] + [ticket]
            self.most = max(self.most, len(self.in_flight))
            return ticket

    layers = 6
    spec, _, state = write_model(tmp_path / "m", layers=layers)
    device = SlowDownloads(seed=4)
    store = _Store()
    with Engine(spec, ResidentSource.from_state_dict(spec, state), device, prefetch=0, offload_inputs=True) as engine:
        def compute(phase, unit, weights):
            if 1 <= unit <= layers:
                if phase is Phase.FORWARD:
                    store.saved[unit] = torch.full((3, 100), float(unit))
                else:
                    store.back.append(store.saved.pop(unit).clone())

        engine.run(compute, backward_units=range(1, layers + 1), inputs=store)
    assert device.downloads >= 4 and sorted(float(x[0, 0]) for x in store.back) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert device.most <= 2, device.most
