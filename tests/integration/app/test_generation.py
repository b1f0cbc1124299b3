"""Generation with the KV cache through the streaming engine, and ``lema generate``."""

from __future__ import annotations

import functools

import pytest
import torch
from click.testing import CliRunner

from lema import LemaConfig, LemaModel
from lema.app.tools.generation import choose_tokens, generate, kv_cache_bytes
from lema.cli import main
from lema.errors import ConfigError
from tests.model_files import save_monolithic
from tests.tiny_models import build_hf_model

NEW = 8
GEN_KINDS = ("llama", "mistral", "qwen2", "gpt2")


@functools.lru_cache(maxsize=None)
def _hf(kind: str):
    model = build_hf_model(kind, seed=4)
    if kind == "gpt2":  # at GPT-2's init scale the tied embedding wins: every step repeats one token
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(5.0)
    return model


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return {kind: save_monolithic(_hf(kind), root / f"{kind}.safetensors") for kind in GEN_KINDS}


def _model(path, **overrides) -> LemaModel:
    from lema.adapters.devices.cpu import CpuDevice

    # A CpuDevice that counts every allocation, so the KV cache's bytes are observable.
    return LemaModel(LemaConfig(gbi_path=str(path), device="cpu", lora_rank=4, **overrides),
                     device=CpuDevice(count_compute=True))


def _with_adapter(model: LemaModel) -> LemaModel:
    model.initialize_lora(seed=1)
    with torch.no_grad():  # B starts at zero: make the adapters change the tokens
        for p in model.get_trainable_parameters():
            p.normal_(0.0, 0.2)
    return model


def _prompts(batch: int = 2, seq: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _slow_greedy(model: LemaModel, ids: torch.Tensor, new: int) -> torch.Tensor:
    """The clearly correct reference: re-run the whole prefix through ``model.forward`` per token."""
    for _ in range(new):
        ids = torch.cat((ids, model.logits(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids


@pytest.mark.parametrize("kind", GEN_KINDS)
@pytest.mark.parametrize("adapters", [False, True], ids=["base", "lora"])
def test_cached_greedy_tokens_equal_recomputing_the_prefix_each_step(model_files, kind, adapters):
    model = _model(model_files[kind])
    if adapters:
        _with_adapter(model)
    ids = _prompts()
    assert torch.equal(generate(model, ids, NEW), _slow_greedy(model, ids, NEW))


def test_adapters_change_what_is_generated(model_files):
    ids = _prompts()
    base = generate(_model(model_files["llama"]), ids, NEW)
    tuned = generate(_with_adapter(_model(model_files["llama"])), ids, NEW)
    assert not torch.equal(base, tuned)


@pytest.mark.parametrize("kind", GEN_KINDS)
def test_greedy_tokens_equal_transformers_generate(model_files, kind):
    hf, model = _hf(kind), _model(model_files[kind])
    ids = _prompts(seq=9, seed=5)  # mistral: prompt + new tokens run past the window of 5
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                           do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, ids, NEW), expected)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_left_padded_batch_equals_transformers_generate(model_files, kind):
    hf, model = _hf(kind), _model(model_files[kind])
    ids = _prompts(batch=3, seq=7, seed=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids = ids.masked_fill(mask == 0, 1)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                           pad_token_id=1)
    assert torch.equal(generate(model, ids, NEW, attention_mask=mask), expected)


def test_sampling_is_reproducible_with_a_seed(model_files):
    model = _model(model_files["llama"])
    ids = _prompts(batch=1)
    opts = dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    a = generate(model, ids, NEW, seed=7, **opts)
    assert torch.equal(a, generate(model, ids, NEW, seed=7, **opts))
    others = [generate(model, ids, NEW, seed=s, **opts) for s in (8, 9, 10)]
    assert any(not torch.equal(a, o) for o in others)
    assert torch.equal(generate(model, ids, NEW, do_sample=True, top_k=1, seed=3), generate(model, ids, NEW))


def test_top_p_and_top_k_keep_only_the_most_likely_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(choose_tokens(logits, do_sample=True, top_k=2, generator=gen).tolist()) == {0, 1}
    # softmax: 0.665, 0.245, 0.090, ...: top_p=0.8 keeps the first two
    assert set(choose_tokens(logits, do_sample=True, top_p=0.8, generator=gen).tolist()) == {0, 1}
    assert set(choose_tokens(logits, do_sample=True, top_p=0.5, generator=gen).tolist()) == {0}


def test_eos_stops_each_row_and_finished_rows_emit_padding(model_files):
    model = _model(model_files["llama"])
    ids = _prompts()
    free = generate(model, ids, NEW)
    eos = int(free[0, ids.shape[1] + 2])  # row 0's third new token
    out = generate(model, ids, NEW, eos_token_id=eos, pad_token_id=0)
    row0 = out[0, ids.shape[1]:]
    stop = int((row0 == eos).nonzero()[0])
    assert torch.equal(row0[:stop + 1], free[0, ids.shape[1]:ids.shape[1] + stop + 1])
    assert (row0[stop + 1:] == 0).all()
    single = generate(model, ids[:1], NEW, eos_token_id=eos)
    assert single.shape[1] == ids.shape[1] + stop + 1 and int(single[0, -1]) == eos


def test_stream_sees_each_token_and_the_kv_cache_is_counted_on_the_device(model_files):
    model = _model(model_files["llama"])
    ids = _prompts(batch=1)
    base = model.device.current_bytes()
    seen: list[tuple[int, int]] = []
    out = generate(model, ids, NEW, stream=lambda t: seen.append((t, model.device.current_bytes())))
    assert [t for t, _ in seen] == out[0, ids.shape[1]:].tolist()
    # While token s is chosen, the cache holds the prompt and the s tokens before it; besides it
    # only the last logits (one fp32 row) are alive.
    for s, (_, used) in enumerate(seen):
        cache = kv_cache_bytes(model, 1, ids.shape[1] + s)
        assert cache <= used - base <= cache + 4 * model.spec.vocab_size
    assert model.device.current_bytes() == base


def test_bad_options_are_named_together(model_files):
    model = _model(model_files["gpt2"])
    with pytest.raises(ConfigError, match=r"temperature=0.*top_p=1.5.*\[0, 128\)"):
        generate(model, [[1, 500]], 4, do_sample=True, temperature=0, top_p=1.5)
    with pytest.raises(ConfigError, match="pad prompts on the left"):
        generate(model, [[1, 2, 3]], 4, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ConfigError, match="64 learned positions"):
        generate(model, [[1] * 60], 10)


# -- the command line ---------------------------------------------------------------------------

CORPUS = "the cat sat on the mat. the dog sat on the log. a cat and a dog met on the mat.\n" * 20


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny llama whose vocabulary is a byte-level BPE tokenizer's, saved beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lema.data.tokenizer import build_byte_tokenizer
    from tests.tiny_models import tiny_config

    folder = tmp_path_factory.mktemp("cli")
    tok = build_byte_tokenizer(CORPUS, vocab_size=300)
    tok.save_pretrained(str(folder))
    cfg = {**tiny_config("llama"), "vocab_size": len(tok)}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    return save_monolithic(hf, folder / "model.safetensors"), tok


def test_cli_prints_the_prompt_and_the_greedy_continuation(cli_model):
    path, tok = cli_model
    result = CliRunner().invoke(main, ["generate", "--model", str(path), "--prompt", "the cat", "--max-new-tokens",
                                       "6", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    ids = tok("the cat", return_tensors="pt")["input_ids"]
    out = generate(_model(path), ids, 6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    expected = "the cat" + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) + "\n"
    assert result.output == expected


def test_cli_samples_reproducibly_with_an_adapter_checkpoint(cli_model, tmp_path):
    path, _ = cli_model
    model = _with_adapter(_model(path))
    model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.0)).save_checkpoint(tmp_path / "ckpt")
    args = ["generate", "--model", str(path), "--adapter", str(tmp_path / "ckpt"), "--prompt", "a dog",
            "--max-new-tokens", "5", "--temperature", "0.8", "--seed", "3", "--device", "cpu", "--no-echo"]
    first, second = CliRunner().invoke(main, args), CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.output == second.output


def test_cli_missing_adapter_is_one_error_line_and_exit_2(cli_model, tmp_path):
    path, _ = cli_model
    result = CliRunner().invoke(main, ["generate", "--model", str(path), "--adapter", str(tmp_path / "nope"),
                                       "--prompt", "the cat", "--device", "cpu"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "--adapter" in lines[0]


def test_cli_without_a_tokenizer_asks_for_one(model_files):
    result = CliRunner().invoke(main, ["generate", "--model", str(model_files["llama"]), "--prompt", "hi",
                                       "--device", "cpu"])
    assert result.exit_code == 2
    assert result.output.startswith("Error:") and "--tokenizer" in result.output


def test_cli_bad_sampling_option_prints_nothing_but_the_error(cli_model):
    path, _ = cli_model
    result = CliRunner().invoke(main, ["generate", "--model", str(path), "--prompt", "the cat", "--top-p", "2",
                                       "--device", "cpu"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["Error: generate: top_p=2.0 must be in (0, 1]"]


def test_cli_greedy_flag_overrides_sampling_options(cli_model):
    path, _ = cli_model
    base = ["generate", "--model", str(path), "--prompt", "the cat", "--max-new-tokens", "5", "--device", "cpu"]
    greedy = CliRunner().invoke(main, base)
    forced = CliRunner().invoke(main, base + ["--greedy", "--temperature", "5", "--seed", "1"])
    assert greedy.exit_code == forced.exit_code == 0
    assert greedy.output == forced.output


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """A tiny llama with a 12-token context, its byte-level tokenizer beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lema.data.tokenizer import build_byte_tokenizer
    from tests.tiny_models import tiny_config

    folder = tmp_path_factory.mktemp("short")
    tok = build_byte_tokenizer(CORPUS, vocab_size=300)
    tok.save_pretrained(str(folder))
    cfg = {**tiny_config("llama"), "vocab_size": len(tok), "max_position_embeddings": 12}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    return save_monolithic(hf, folder / "model.safetensors"), tok


def test_cli_stops_at_the_context_length_with_a_note(short_context_model):
    """--max-new-tokens beyond the context is capped: prompt + new tokens = the 12-token context."""
    path, tok = short_context_model
    result = CliRunner().invoke(main, ["generate", "--model", str(path), "--prompt", "the cat", "--max-new-tokens",
                                       str(2**70), "--device", "cpu", "--no-echo"])
    assert result.exit_code == 0, result.output
    ids = tok("the cat", return_tensors="pt")["input_ids"]
    room = 12 - ids.shape[1]
    assert result.stderr == (f"note: the model's context is 12 tokens and the prompt takes {ids.shape[1]}: generating "
                             f"at most {room} new tokens (--max-new-tokens {2**70} is capped)\n")
    out = generate(_model(path), ids, room, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert result.stdout == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) + "\n"


def test_cli_a_prompt_as_long_as_the_context_is_one_error_line(short_context_model):
    path, _ = short_context_model
    result = CliRunner().invoke(main, ["generate", "--model", str(path), "--prompt", "the cat sat on the mat " * 4,
                                       "--device", "cpu"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "but the model's context is 12 tokens" in result.stderr
    assert result.stdout == ""
