"""axon_shared: the small set of layers and training utilities that two or more Axon packages use."""

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    average_checkpoints,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    prune_checkpoints,
    save_checkpoint,
)
from .config import AxonConfig, ConfigError, read_config_file, require, require_choice, require_positive
from .distributed import DistContext, all_reduce_mean, barrier, cleanup_distributed, pick_device, set_threads, setup_distributed, shard, wrap_model
from .ema import EMA
from .layers import FeedForward, RMSNorm, SwiGLU, attention, causal_mask, padding_mask, sinusoidal_embedding
from .metrics import MetricsLogger, plot_metrics, read_metrics
from .progress import progress_bar
from .schedules import CosineSchedule, NoamSchedule, WarmupConstantSchedule, set_lr
from .seed import capture_rng_state, restore_rng_state, seed_everything
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_sentencepiece

__all__ = [name for name in dir() if not name.startswith("_")]
