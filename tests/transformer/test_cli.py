"""The command line: train -> evaluate / translate / average on a tiny real-data run."""

import json

import pytest

from transformer.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    main(["train", "--preset", "tiny", "--model.vocab_size", "300", "--model.max_len", "48", "--data.train_limit", "300",
          "--data.valid_limit", "20", "--data.max_tokens", "400", "--data.spm_sample", "600", "--train.out_dir", str(out),
          "--train.max_steps", "4", "--train.save_every", "2", "--train.eval_every", "4", "--train.eval_bleu_sentences", "4"])
    return out


def test_train_writes_a_run_directory(run_dir):
    assert (run_dir / "config.json").is_file() and (run_dir / "spm.model").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002.safetensors", "step_00000004.safetensors"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("valid_bleu" in row for row in rows) and any("train_loss" in row for row in rows)
    assert (run_dir / "loss.png").is_file()


def test_evaluate_prints_signature(run_dir, capsys):
    result = main(["evaluate", "--run_dir", str(run_dir), "--limit", "6", "--beam_size", "2", "--average_last", "2"])
    out = capsys.readouterr().out
    assert "sacreBLEU signature: nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in out
    assert result["sentences"] == 6 and {"greedy", "beam2"} <= set(result)
    assert (run_dir / "eval_test.json").is_file()


def test_translate_positional_text(run_dir, capsys):
    outputs = main(["translate", "--run_dir", str(run_dir), "--beam_size", "2", "Open the file.", "", "Click OK."])
    assert len(outputs) == 3 and outputs[1] == ""
    assert capsys.readouterr().out.count("\n") == 3


def test_average_command(run_dir):
    from axon_shared.checkpoint import load_checkpoint

    path = main(["average", "--run_dir", str(run_dir), "--last", "2"])
    assert load_checkpoint(path).extra["averaged"] == ["step_00000002.safetensors", "step_00000004.safetensors"]


def test_bad_flag_names_the_field(run_dir):
    with pytest.raises(SystemExit, match="TransformerConfig.d_model"):
        main(["train", "--preset", "tiny", "--model.d_model", "30", "--train.out_dir", str(run_dir / "x")])
