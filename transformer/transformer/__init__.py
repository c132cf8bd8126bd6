"""Attention Is All You Need (Vaswani et al. 2017): the encoder-decoder Transformer, trained en->de on CPU."""

from .config import DataConfig, TrainConfig, TrainSection, TransformerConfig
from .decoding import Hypothesis, beam_search, greedy_decode, length_penalty
from .loss import label_smoothed_loss
from .model import FeedForward, MultiHeadAttention, Transformer

__all__ = [
    "DataConfig",
    "FeedForward",
    "Hypothesis",
    "MultiHeadAttention",
    "TrainConfig",
    "TrainSection",
    "Transformer",
    "TransformerConfig",
    "beam_search",
    "greedy_decode",
    "label_smoothed_loss",
    "length_penalty",
]
