"""The SAM 3 tracker in Flax: memory attention, memory encoder, SAM prompt encoder and mask decoder,
``Tracker.track_step`` (one frame, static shapes) and the memory bank that feeds it."""
from sam3_jax.model.tracker.config import TrackerConfig
from sam3_jax.model.tracker.mask_decoder import MaskDecoder
from sam3_jax.model.tracker.memory_attention import MemoryAttention, MemoryTransformer
from sam3_jax.model.tracker.memory_bank import MemoryBank, select_memory
from sam3_jax.model.tracker.memory_encoder import MemoryEncoder
from sam3_jax.model.tracker.prompt_encoder import PromptEncoder
from sam3_jax.model.tracker.tracker import SelectedMemory, Tracker

__all__ = ["MaskDecoder", "MemoryAttention", "MemoryBank", "MemoryEncoder", "MemoryTransformer", "PromptEncoder",
           "SelectedMemory", "Tracker", "TrackerConfig", "select_memory"]
