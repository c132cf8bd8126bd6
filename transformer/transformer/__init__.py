"""Attention Is All You Need (Vaswani et al. 2017): the encoder-decoder Transformer, trained en->de on CPU."""

from .config import DataConfig, TrainConfig, TrainingConfig, TransformerConfig
from .decoding import Hypothesis, beam_search, greedy_decode, length_penalty
from .loss import label_smoothed_loss
from .model import MultiHeadAttention, Transformer, count_parameters

__all__ = [
    "DataConfig", "Hypothesis", "MultiHeadAttention", "TrainConfig", "TrainingConfig", "Transformer", "TransformerConfig",
    "beam_search", "count_parameters", "greedy_decode", "label_smoothed_loss", "length_penalty",
]
