"""axon_shared: the layers and the training machinery that two or more Axon packages use (see README.md)."""

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    average_checkpoints,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    prune_checkpoints,
    run_checkpoints,
    save_checkpoint,
)
from .config import AxonConfig, ConfigError, read_config_file, require, require_choice, require_positive
from .distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    pick_device,
    set_threads,
    setup_distributed,
    wrap_model,
)
from .ema import EMA
from .errors import AxonError, ConfigMismatchError, Interrupted, RunLockedError
from .layers import Dropout, attention, causal_mask, dropout, padding_mask, sinusoidal_embedding
from .metrics import MetricsLogger, plot_metrics, read_metrics
from .progress import RunProgress, progress_bar
from .schedules import CosineSchedule, WarmupConstantSchedule, set_lr
from .seed import capture_rng_state, restore_rng_state, seed_everything
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_sentencepiece
from .training import Trainer, TrainSection, batch_indices, bf16_autocast, count_parameters, decay_groups, native_bf16

__all__ = [name for name in dir() if not name.startswith("_")]
