"""Schedules, EMA, metrics, seeding, config and CLI."""

import dataclasses
import json
from typing import ClassVar

import pytest
import torch
from torch.testing import assert_close

from axon_shared import EMA, CosineSchedule, MetricsLogger, WarmupConstantSchedule, plot_metrics, read_metrics
from axon_shared.cli import Command, build_cli
from axon_shared.config import AxonConfig, ConfigError, require


def test_cosine_known_values():
    cos = CosineSchedule(max_lr=3e-4, warmup=100, total=1100, min_ratio=0.1)
    assert cos(0) == pytest.approx(3e-6)
    assert cos(99) == pytest.approx(3e-4)
    assert cos(600) == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5))  # halfway through the decay
    assert cos(1100) == pytest.approx(3e-5) and cos(5000) == pytest.approx(3e-5)


def test_warmup_constant():
    sched = WarmupConstantSchedule(2e-4, warmup=5000)
    assert sched(0) == pytest.approx(2e-4 / 5000) and sched(4999) == pytest.approx(2e-4) and sched(10**6) == 2e-4


def test_ema_arithmetic():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # 0.9 * 1 + 0.1 * 3
    assert_close(ema.shadow["weight"], torch.full((1, 2), 1.2))
    ema.update(model)  # 0.9 * 1.2 + 0.1 * 3
    assert_close(ema.shadow["weight"], torch.full((1, 2), 1.38))
    with ema.applied_to(model):
        assert_close(model.weight.data, torch.full((1, 2), 1.38))
    assert_close(model.weight.data, torch.full((1, 2), 3.0))
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


def test_ema_warmup_decay():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(90) == pytest.approx(0.91)
    assert ema.decay_at(10**6) == 0.999  # capped at the configured decay
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, step=0)  # 0.1 * 1 + 0.9 * 3: the first update nearly copies the weights
    assert_close(ema.shadow["weight"], torch.full((1, 2), 2.8))
    with pytest.raises(ValueError, match="step"):
        ema.update(model)


def test_metrics_logger_resume_drops_later_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLogger(path)
    for step in range(1, 6):
        log.log(step, loss=torch.tensor(1.0 / step))
    MetricsLogger(path, resume_step=3).log(4, loss=0.5)
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.5
    png = plot_metrics(path, tmp_path / "loss.png")
    assert png.stat().st_size > 1000


@dataclasses.dataclass
class Inner(AxonConfig):
    dim: int = 8
    heads: int = 2
    betas: tuple[float, float] = (0.9, 0.98)

    def validate(self):
        require(self.dim % self.heads == 0, self, "dim", f"must be divisible by heads={self.heads}")


@dataclasses.dataclass
class Outer(AxonConfig):
    inner: Inner = dataclasses.field(default_factory=Inner)
    lr: float = 1e-3
    PRESETS: ClassVar = {"small": {"inner": {"dim": 4}}, "big": {"inner": {"dim": 64, "heads": 8}, "lr": 3e-4}}


def test_config_presets_files_and_errors(tmp_path):
    assert Outer.from_preset("big").inner.heads == 8
    assert Outer.from_preset("big", inner={"dim": 128}).inner == Inner(dim=128, heads=8)
    (tmp_path / "c.yaml").write_text("inner:\n  betas: [0.9, 0.95]\nlr: 1\n")
    loaded = Outer.from_file(tmp_path / "c.yaml", preset="small")
    assert loaded.inner.betas == (0.9, 0.95) and loaded.lr == 1.0 and isinstance(loaded.lr, float)
    (tmp_path / "c.toml").write_text("[inner]\ndim = 6\nheads = 3\n")
    assert Outer.from_file(tmp_path / "c.toml").inner.dim == 6
    assert Outer.from_dict(json.loads(Outer().to_json())) == Outer()
    with pytest.raises(ConfigError, match=r"Inner.dim=9: must be divisible by heads=2"):
        Outer.from_dict({"inner": {"dim": 9}})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['dimm'\]"):
        Inner.from_dict({"dimm": 3})
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        Outer.from_preset("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        Outer.from_file(tmp_path / "missing.yaml")


def test_cli_layers_preset_file_and_flags(tmp_path, capsys):
    seen = []
    main = build_cli("demo", {"train": Command(seen.append, Outer, "train", default_preset="small")})
    (tmp_path / "o.yaml").write_text("lr: 0.5\ninner:\n  heads: 4\n")
    main(["train", "--preset", "big", "--config", str(tmp_path / "o.yaml"), "--inner.dim", "32"])
    assert seen[-1] == Outer(inner=Inner(dim=32, heads=4), lr=0.5)
    main(["train"])
    assert seen[-1] == Outer.from_preset("small")
    with pytest.raises(SystemExit, match=r"Inner.dim=7: must be divisible"):
        main(["train", "--inner.dim", "7"])
    with pytest.raises(SystemExit, match="unknown command"):
        main(["fly"])


def test_cli_accepts_a_config_without_presets():
    seen = []
    main = build_cli("demo", {"run": Command(seen.append, Inner, "run")})
    main(["run", "--dim", "12", "--heads", "3"])
    assert seen == [Inner(dim=12, heads=3)]


def test_console_invocation_exits_zero(monkeypatch):
    main = build_cli("demo", {"run": Command(lambda cfg: {"a": 1}, Inner, "run")})
    assert main(["run"]) == {"a": 1}
    monkeypatch.setattr("sys.argv", ["demo", "run"])
    assert main() is None  # sys.exit(None) exits 0


def test_cli_shows_the_projects_errors_as_one_line(capsys):
    import errno

    from axon_shared.checkpoint import CheckpointError
    from axon_shared.errors import Interrupted

    def fail(error):
        def run(cfg):
            raise error

        return run

    main = build_cli(
        "demo",
        {
            "bad": Command(fail(CheckpointError("ckpt.safetensors: corrupted; delete it")), Inner, "bad"),
            "full": Command(fail(OSError(errno.ENOSPC, "No space left on device", "/runs/x/step.safetensors")), Inner, "full"),
            "stop": Command(fail(Interrupted("SIGINT at step 3: saved it", 2, 3)), Inner, "stop"),
            "bug": Command(fail(ZeroDivisionError("a bug")), Inner, "bug"),
        },
    )
    with pytest.raises(SystemExit, match=r"^demo bad: error: ckpt.safetensors: corrupted; delete it \(--debug shows the traceback\)$"):
        main(["bad"])
    with pytest.raises(CheckpointError):
        main(["bad", "--debug"])
    with pytest.raises(SystemExit, match=r"^demo full: error: No space left on device: /runs/x/step.safetensors"):
        main(["full"])
    with pytest.raises(SystemExit) as stopped:
        main(["stop"])
    assert stopped.value.code == 130 and capsys.readouterr().err.strip() == "demo stop: SIGINT at step 3: saved it"
    with pytest.raises(ZeroDivisionError):  # a bug in our code keeps its traceback
        main(["bug"])


def test_text_arguments_are_valid_unicode(capsys):
    from axon_shared.cli import text_argument

    assert text_argument("Click 😀 OK") == "Click 😀 OK"
    assert capsys.readouterr().err == ""
    undecodable = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python passes such argv bytes
    assert text_argument(undecodable) == "caf\ufffd"
    assert "not valid UTF-8" in capsys.readouterr().err


def test_a_bad_device_fails_at_once_with_the_fix():
    from axon_shared.distributed import pick_device

    with pytest.raises(ConfigError, match="'gpu0' is not a device; use auto, cpu, cuda or cuda:N"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="this machine has no CUDA device"):
            pick_device("cuda")
    assert pick_device("cpu") == torch.device("cpu")


def test_configs_saved_by_an_earlier_version_still_load():
    """A checkpoint's config with fields this version dropped (x_llama's data.batch_size moved to train) loads;
    a fresh config with an unknown field is still refused."""
    saved = {"inner": {"dim": 12, "heads": 3, "old_field": 1}, "lr": 0.5, "max_tokens": 4096}
    assert Outer.from_saved(saved) == Outer(inner=Inner(dim=12, heads=3), lr=0.5)
    with pytest.raises(ConfigError, match="unknown field"):
        Outer.from_dict(saved)
    with pytest.raises(ConfigError, match=r"Inner.dim=7: must be divisible"):
        Outer.from_saved({"inner": {"dim": 7}})
