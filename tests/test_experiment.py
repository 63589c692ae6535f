"""The experiment suite end to end on a micro configuration: every variant and metric reaches the report."""

import dataclasses
import json

import pytest

from mtpd.errors import MtpdError
from mtpd.experiment import SUITES, Scale, run_suite, suite_variants
from mtpd.report import write_experiment_report

MICRO = Scale("micro", tokens=4 * 4 * 32, batch_size=4, seq_len=32, warmup_steps=1, eval_windows=2, bench_prompts=2,
              bench_prompt_tokens=8, bench_new_tokens=8, draft_threshold=0.5, cost_probe_steps=1)




def test_paper_suite_runs_end_to_end_and_reports_every_variant(tmp_path, corpus_dir):
    lines = []
    summary = run_suite("paper", MICRO, tmp_path, str(corpus_dir), device="cpu", log=lines.append,
                        show_progress=False)
    names = [v.name for v in suite_variants("paper", MICRO)]
    assert [r["name"] for r in summary["variants"]] == names
    assert {"mtp-k1", "mtpd-k1", "mtp-k4", "mtpd-k4", "mtpd-k4-no-stop-grad", "mtpd-k4-top10", "mtpd-k4-top100",
            "mtpd-k4-full-vocab", "mtpd-k4-beta1.0", "mtpd-k4-beta1.5", "mtpd-k4-reverse-kl", "mtpd-k8-looped",
            "mtpd-k16-looped", "mtpd-k8-joint"} == set(names)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["suite"] == "paper" and saved["training_cost"]["mtpd_vs_mtp"] > 0
    for result in saved["variants"]:
        K = result["heads"]
        assert len(result["offline_acceptance"]) == K and len(result["head_ce"]) == K and result["val_loss"] > 0
        for threshold in ("0", "0.5"):
            online = result["online"][threshold]
            assert len(online["cumulative_acceptance"]) == K and online["identical_to_baseline"] is True
            assert online["speedup"] > 0 and online["mean_accepted_tokens"] >= 1
    by_name = {r["name"]: r for r in saved["variants"]}
    assert by_name["mtp-k4"]["objective"]["resolved_beta"] == 0.0
    assert by_name["mtpd-k4"]["objective"]["resolved_beta"] == 0.5
    assert by_name["mtpd-k1"]["objective"]["resolved_beta"] == 1.0
    assert by_name["mtpd-k4-no-stop-grad"]["objective"]["stop_grad"] is False
    assert by_name["mtpd-k4-reverse-kl"]["objective"]["kl_direction"] == "reverse"
    assert by_name["mtpd-k16-looped"]["history"][-1]["from_heads"] == 8
    looped8, looped16 = by_name["mtpd-k8-looped"], by_name["mtpd-k16-looped"]
    assert looped16["total_tokens"] == by_name["mtpd-k4"]["tokens"] + looped8["tokens"] + looped16["tokens"]
    step = MICRO.batch_size * MICRO.seq_len  # the joint run matches the looped run's total, to within a step
    assert abs(by_name["mtpd-k8-joint"]["total_tokens"] - looped8["total_tokens"]) <= step

    paths = write_experiment_report(saved, tmp_path)
    report = (tmp_path / "report.md").read_text()
    for name in names:
        assert f"| {name} |" in report
    for heading in ("MTP-D vs MTP, 4 heads", "Training cost", "Dynamic draft length"):
        assert heading in report
    for png in ("car_per_head.png", "beta.png", "speedup_vs_heads.png", "training_cost.png"):
        assert (tmp_path / png).stat().st_size > 1000 and tmp_path / png in paths

    again = []
    run_suite("paper", MICRO, tmp_path, str(corpus_dir), device="cpu", log=again.append, show_progress=False)
    assert sum("skipped" in line for line in again) == len(names)
    # finished variants are reused only for the settings they were trained with
    with pytest.raises(MtpdError, match=r"other settings \(tokens differ\)"):
        run_suite("paper", dataclasses.replace(MICRO, tokens=2 * MICRO.tokens), tmp_path, str(corpus_dir),
                  device="cpu", log=again.append, show_progress=False)
    with pytest.raises(MtpdError, match=r"other settings \(data differ\)"):
        run_suite("paper", MICRO, tmp_path, None, device="cpu", log=again.append, show_progress=False)


def test_unknown_suite_is_a_clear_error():
    from mtpd.errors import MtpdError

    with pytest.raises(MtpdError, match="unknown suite 'nope': choose one of " + ", ".join(SUITES)):
        suite_variants("nope", MICRO)


def test_a_benchmark_longer_than_the_presets_context_is_refused_before_training(tmp_path):
    too_long = dataclasses.replace(MICRO, bench_prompt_tokens=64, bench_new_tokens=96)  # micro's context: 128
    with pytest.raises(MtpdError, match="preset micro has a context of 128 tokens"):
        run_suite("paper", too_long, tmp_path / "exp", device="cpu", log=lambda line: None, show_progress=False)
    assert not (tmp_path / "exp").exists()
