"""`x-llama ablate` end to end on the tiny preset: same budget and data for every variant, a table with intervals
over seeds, resumable without retraining."""

from __future__ import annotations

import json
import math
import statistics

from torch.testing import assert_close

from x_llama.ablate import mean_interval, paired_difference, summary_table, variant_train_config
from x_llama.cli import main
from x_llama.config import AblateConfig, TrainConfig


def test_mean_interval_is_the_student_t_interval():
    """Two seeds: half-width t(0.975, 1) * s / sqrt(2) with t = 12.706 (a normal 1.96 would be far too narrow)."""
    mean, half = mean_interval([10.0, 12.0])
    assert mean == 11.0
    assert_close(half, 12.7062 * math.sqrt(2.0) / math.sqrt(2), rtol=1e-4, atol=0)
    assert mean_interval([3.0]) == (3.0, 0.0)


def test_paired_difference_cancels_the_shared_seed_effect():
    """Seeds 1 and 2 move both variants together (+10): each variant's own interval is wide, the paired difference
    (-5.0, -5.2 per seed) is narrow and excludes 0; seeds only one of them ran are left out."""
    rows = {"baseline": [(1, 60.0), (2, 70.0)], "alibi": [(1, 55.0), (2, 64.8), (3, 50.0)]}
    results = {
        f"{v}-s{seed}": {"variant": v, "seed": seed, "ppl_1x": p, "params": 1e6, "active_params": 1e6}
        for v, pairs in rows.items()
        for seed, p in pairs
    }
    mean, half, n = paired_difference(results, "alibi")
    assert n == 2 and abs(mean + 5.1) < 1e-9
    assert_close(half, 12.7062 * statistics.stdev([-5.0, -5.2]) / math.sqrt(2), rtol=1e-4, atol=0)
    assert mean + half < 0 < mean_interval([55.0, 64.8])[1] - 5.1  # the paired interval excludes 0, the variant's own would not
    assert paired_difference(results, "nope") is None
    table = summary_table(results, ["baseline", "alibi"], 10, TrainConfig.from_preset("tiny"))
    assert "| alibi | 3 | 56.60 ± " in table and "(55.00, 64.80, 50.00)" in table and f"| -5.10 ± {half:.2f} |" in table


def test_variants_share_budget_data_and_optimiser():
    cfg = AblateConfig(base="tiny", steps=7)
    configs = [variant_train_config(cfg, name, 2, 7) for name in ("baseline", "moe", "praxis")]
    for c in configs:
        assert (c.train.steps, c.train.seed, c.train.lr, c.train.batch_size, c.data.seq_len) == (7, 2, 3e-3, 16, 64)
        assert c.data.tokenizer == configs[0].data.tokenizer
        assert c.model.max_seq_len == 4 * c.data.seq_len  # evaluation at 4x the training context
    assert configs[1].model.moe.hidden_dim == configs[0].model.hidden_dim // 2  # top-2 of half-size experts


def test_ablate_end_to_end_and_resume(tmp_path):
    out = tmp_path / "ablate"
    args = ["ablate", "--base", "tiny", "--steps", "3", "--seeds", "1", "--variants", "baseline,nope", "--eval_windows", "4"]
    main([*args, "--out_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == ["baseline-s1", "nope-s1"]
    for row in results.values():
        assert row["steps"] == 3 and row["peak_memory_mib"] > 0 and row["decode_tokens_per_s"] > 0
        assert all(math.isfinite(row[f"ppl_{f}x"]) for f in (1, 2, 4))
    table = (out / "ABLATION.md").read_text()
    assert "| baseline | 1 |" in table and "| nope | 1 |" in table
    assert (out / "ablation.png").is_file()
    checkpoints = sorted((out / "baseline-s1" / "checkpoints").iterdir())
    stamps = [p.stat().st_mtime_ns for p in checkpoints]
    main([*args, "--out_dir", str(out)])  # resumes: nothing is retrained
    assert [p.stat().st_mtime_ns for p in sorted((out / "baseline-s1" / "checkpoints").iterdir())] == stamps
    assert json.loads((out / "results.json").read_text()) == results
    main([*args[:-1], "2", "--out_dir", str(out)])  # other evaluation windows: re-measured, not retrained
    remeasured = json.loads((out / "results.json").read_text())
    assert [p.stat().st_mtime_ns for p in sorted((out / "baseline-s1" / "checkpoints").iterdir())] == stamps
    assert remeasured["baseline-s1"]["eval_windows"] == 2
    assert remeasured["baseline-s1"]["peak_memory_mib"] == results["baseline-s1"]["peak_memory_mib"]
