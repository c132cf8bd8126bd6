"""The command line: train -> evaluate / translate / average on a tiny real-data run."""

import json

import pytest
import torch

from transformer.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    main(
        [
            "train",
            "--preset",
            "tiny",
            "--model.vocab_size",
            "300",
            "--model.max_len",
            "48",
            "--data.train_limit",
            "300",
            "--data.valid_limit",
            "20",
            "--train.batch_size",
            "400",
            "--data.spm_sample",
            "600",
            "--train.out_dir",
            str(out),
            "--train.steps",
            "4",
            "--train.checkpoint_every",
            "2",
            "--train.eval_every",
            "4",
            "--train.eval_bleu_sentences",
            "4",
            "--train.progress",
            "false",
        ]
    )
    return out


def test_train_writes_a_run_directory(run_dir):
    assert (run_dir / "config.json").is_file() and (run_dir / "spm.model").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002.safetensors", "step_00000004.safetensors"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("valid/bleu" in row for row in rows) and any("train/loss" in row for row in rows)
    assert (run_dir / "loss.png").is_file()


def test_evaluate_prints_signature(run_dir, capsys):
    result = main(["evaluate", "--run_dir", str(run_dir), "--limit", "6", "--beam_size", "2", "--average_last", "2"])
    out = capsys.readouterr().out
    assert "sacreBLEU signature: nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in out
    assert result["sentences"] == 6 and {"greedy", "beam2"} <= set(result)
    assert (run_dir / "eval_test.json").is_file()


def test_translate_positional_text(run_dir, capsys):
    outputs = main(
        ["translate", "--run_dir", str(run_dir), "--beam_size", "2", "Open the file.", "", "Click 😀 OK.", "--", "--verbose text"]
    )
    assert len(outputs) == 4 and outputs[1] == ""
    assert capsys.readouterr().out.count("\n") == 4
    with pytest.raises(SystemExit, match="TranslateConfig.alpha=-5.0: must be >= 0"):
        main(["translate", "--run_dir", str(run_dir), "--alpha", "-5", "Hello"])


def test_translate_reads_stdin_that_is_not_utf8(run_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Open the file.\nClick \xff OK.\n")))
    outputs = main(["translate", "--run_dir", str(run_dir), "--beam_size", "1"])
    assert len(outputs) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


def test_runtime_errors_are_one_line(run_dir, tmp_path):
    (tmp_path / "broken" / "checkpoints").mkdir(parents=True)
    (tmp_path / "broken" / "checkpoints" / "step_00000001.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(
        SystemExit, match=r"^transformer evaluate: error: .*corrupted or truncated checkpoint.*\(--debug shows the traceback\)$"
    ):
        main(["evaluate", "--run_dir", str(tmp_path / "broken")])
    with pytest.raises(SystemExit, match=r"transformer translate: error: .*not a checkpoint of a TransformerConfig model"):
        from axon_shared.checkpoint import save_checkpoint

        save_checkpoint(
            tmp_path / "other" / "checkpoints" / "step_00000001.safetensors", model=torch.nn.Linear(2, 2), config={"model": {"ch": 3}}
        )
        main(["translate", "--run_dir", str(tmp_path / "other"), "Hi"])


def test_use_ema_on_a_run_without_an_ema_names_the_fix(run_dir):
    for command in (["evaluate", "--limit", "2"], ["translate", "Hi"], ["average"], ["export", "--out", str(run_dir / "marian_ema")]):
        with pytest.raises(SystemExit, match=rf"^transformer {command[0]}: error: .*holds no (EMA weights|'ema' tensors)"):
            main([command[0], "--run_dir", str(run_dir), "--use_ema", "true", *command[1:]])


def test_average_command(run_dir):
    from axon_shared.checkpoint import load_checkpoint

    path = main(["average", "--run_dir", str(run_dir), "--last", "2"])
    assert load_checkpoint(path).extra["averaged"] == ["step_00000002.safetensors", "step_00000004.safetensors"]


def test_bad_flag_names_the_field(run_dir):
    with pytest.raises(SystemExit, match="TransformerConfig.d_model"):
        main(["train", "--preset", "tiny", "--model.d_model", "30", "--train.out_dir", str(run_dir / "x")])
