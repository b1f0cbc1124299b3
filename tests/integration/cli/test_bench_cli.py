"""`lema bench`: LEMA and transformers + peft measured side by side, with a JSON result."""

from __future__ import annotations

import json

from click.testing import CliRunner

from lema.cli import main


def test_bench_measures_lema_and_the_reference_in_one_run(tmp_path):
    result = CliRunner().invoke(main, [
        "bench", "--preset", "tiny", "--dtype", "float32", "--batch", "1", "--seq", "16", "--steps", "1",
        "--warmup", "0", "--strategies", "streaming,resident,auto", "--reads", "16M", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    names = [r["name"] for r in data["runs"]]
    assert names == ["lema_streaming", "lema_resident", "lema_auto", "lema_compute_alone", "hf_peft_ckpt",
                     "hf_peft_nockpt"]
    runs = {r["name"]: r for r in data["runs"]}
    assert all(r["step_s"] > 0 for r in data["runs"])
    # Without a simulated link the CPU trains as a user's run does without a budget: on the
    # weights where the host holds them, nothing uploaded (the next test simulates a link).
    assert all(runs[n]["bytes_uploaded_per_step"] == 0 for n in ("lema_streaming", "lema_resident", "lema_auto"))
    for name in ("lema_streaming", "lema_resident"):
        peak, plan = runs[name]["device_peak_bytes"], runs[name]["plan_device_total_bytes"]
        assert abs(peak - plan) / plan <= 0.10
    assert data["link_bandwidth_Bps"] > 0 and data["link_bandwidth_pageable_Bps"] > 0
    assert "lema_streaming/hf_peft_ckpt" in data["ratios"]
    assert "ratio lema_streaming/lema_resident" in result.output
    # The floor: compute alone moves nothing; each streamed run is compared with max(link floor, compute alone).
    assert runs["lema_compute_alone"]["bytes_uploaded_per_step"] == 0
    floor = max(runs["lema_streaming"]["link_floor_s"], runs["lema_compute_alone"]["step_s"])
    assert runs["lema_streaming"]["step_over_floor"] == runs["lema_streaming"]["step_s"] / floor
    assert "step/floor" in result.output and "link:" in result.output and "machine:" in result.output
    assert data["reads"]["bytes"] == 16 << 20 and data["reads"]["parallel_Bps"] > 0
    assert "LEMA's reader" in result.output
    # the plan's predicted step beside each measured one; AUTO keeps activations, same adapters
    for name in ("lema_streaming", "lema_resident", "lema_auto"):
        assert runs[name]["predicted_s"] > 0
        assert runs[name]["predicted_over_measured"] == runs[name]["predicted_s"] / runs[name]["step_s"]
    assert runs["lema_auto"]["kept_layers"] == 4 and runs["lema_streaming"]["kept_layers"] == 0
    assert runs["lema_resident"]["adapters_max_rel_diff"] == 0  # same ops, same values
    assert "predicted s" in result.output and "pred/meas" in result.output


def test_bench_under_a_budget_slots_the_lema_runs_and_predicts_them(tmp_path):
    result = CliRunner().invoke(main, [
        "bench", "--preset", "tiny", "--dtype", "float32", "--batch", "1", "--seq", "16", "--steps", "1",
        "--warmup", "0", "--strategies", "auto", "--no-reference", "--reads", "0", "--vram", "5M",
        "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    runs = {r["name"]: r for r in data["runs"]}
    auto = runs["lema_auto"]
    assert auto["bytes_uploaded_per_step"] > 0 and auto["plan_device_total_bytes"] <= 5 << 20
    assert auto["predicted_s"] > 0
    assert runs["lema_compute_alone"]["bytes_uploaded_per_step"] == 0  # compute alone: no budget


def test_bench_with_a_simulated_link_reports_its_floor(tmp_path):
    result = CliRunner().invoke(main, [
        "bench", "--preset", "tiny", "--dtype", "float32", "--batch", "1", "--seq", "16", "--steps", "1",
        "--warmup", "0", "--strategies", "streaming", "--no-reference", "--reads", "0", "--link-bandwidth", "100M",
        "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["link_bandwidth_Bps"] == 100 << 20
    run = {r["name"]: r for r in data["runs"]}["lema_streaming"]
    assert run["bytes_uploaded_per_step"] > 0  # through the slots, over the simulated link
    assert run["link_floor_s"] == run["bytes_uploaded_per_step"] / (100 << 20)
    assert data["reads"] is None
    # the prediction sees the simulated link: at least the bytes over it
    assert run["predicted_s"] >= run["bytes_uploaded_per_step"] / (100 << 20)


def test_bench_refuses_a_simulated_link_on_a_gpu(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--device", "cuda", "--link-bandwidth", "1G", "--workdir",
                                       str(tmp_path)])
    assert result.exit_code == 2 and "--link-bandwidth" in result.output


def test_bench_rejects_an_unknown_strategy(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--strategies", "fast", "--workdir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.startswith("Error:") and "Traceback" not in result.output
