"""Bit-word helpers shared by the formats that pack positions into int32 words."""
import torch

__all__ = ["to_int32_words"]


def to_int32_words(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
