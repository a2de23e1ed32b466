"""``ModelConfig``: every size and switch of the model, as frozen dataclasses.

``ModelConfig.official()`` equals the reference (docs/reference_model.md, 'Sizes'); ``tiny()`` keeps every code path
(windowed + global blocks, all heads) at sizes that run in seconds on a CPU, and builds the
reference modules at the same sizes for parity tests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 1008
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.625
    window_size: int = 24
    global_att_blocks: tuple[int, ...] = (7, 15, 23, 31)
    pretrain_img_size: int = 336  # the abs pos-embed grid (24x24 + cls) that is tiled
    rope_theta: float = 10000.0
    drop_path_rate: float = 0.1
    ln_eps: float = 1e-5
    # Training memory: rematerialise each block in the backward pass (the reference checkpoints
    # every block in training); the policy is a name in ``jax.checkpoint_policies``.
    remat: bool = True
    remat_policy: str = "nothing_saveable"
    # ``nn.attention.attend``'s implementation: None picks cuDNN flash attention on a GPU in
    # bf16/fp16 and XLA elsewhere; "xla" or "cudnn" forces one.
    attention_impl: str | None = None
    # XLA's CPU dot path in the jits whose cost is this encoder (``nn.compiler.encoder_options``):
    # None turns YNNPACK's dot fusions off from ``compiler.FULL_WIDTH`` on, where XLA's own dots are
    # faster, and keeps XLA's defaults below; True keeps XLA's defaults, False turns them off.
    cpu_ynn: bool | None = None

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def pretrain_grid(self) -> int:
        return self.pretrain_img_size // self.patch_size


@dataclass(frozen=True)
class NeckConfig:
    d_model: int = 256
    scale_factors: tuple[float, ...] = (4.0, 2.0, 1.0)  # the 0.5 level is dropped (scalp=1)
    add_sam2_neck: bool = True  # the tracker's copy (`sam2_convs`)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 32
    width: int = 1024
    heads: int = 16
    layers: int = 24
    mlp_ratio: float = 4.0
    # Rematerialise each block in the backward pass (the reference checkpoints them too);
    # the policy is a name in jax.checkpoint_policies.
    remat: bool = True
    remat_policy: str = "nothing_saveable"


@dataclass(frozen=True)
class GeometryConfig:
    num_layers: int = 3
    num_heads: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.1
    roi_size: int = 7


@dataclass(frozen=True)
class EncoderConfig:
    num_layers: int = 6
    num_heads: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.1
    remat: bool = True  # rematerialise each layer in the backward pass, as the reference checkpoints


@dataclass(frozen=True)
class DecoderConfig:
    num_layers: int = 6
    num_queries: int = 200
    num_heads: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.1
    dac: bool = True  # training doubles the queries (one-to-many half)
    box_rpb: str = "log"
    presence_token: bool = True
    remat: bool = True  # rematerialise each layer in the backward pass, as the reference checkpoints
    scoring_mlp_dim: int = 2048  # hidden width of the dot-product scorer's prompt MLP


@dataclass(frozen=True)
class SegHeadConfig:
    upsampling_stages: int = 3
    num_heads: int = 8  # cross_attend_prompt


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 256
    vit: ViTConfig = field(default_factory=ViTConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    text: TextConfig = field(default_factory=TextConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    seg: SegHeadConfig = field(default_factory=SegHeadConfig)
    # Video detector: pred_logits = clamp(logit(sigmoid(score) * sigmoid(presence)), +-10).
    joint_box_scores: bool = False
    compute_dtype: str = "float32"

    @property
    def image_size(self) -> int:
        return self.vit.img_size

    @classmethod
    def official(cls) -> "ModelConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "ModelConfig":
        """8x8 token grid (112 px), 4 blocks with windows of 4 and 2 global blocks, d_model 64."""
        return cls(
            d_model=64,
            vit=ViTConfig(img_size=112, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0, window_size=4,
                          global_att_blocks=(1, 3), pretrain_img_size=56, drop_path_rate=0.0),
            neck=NeckConfig(d_model=64),
            text=TextConfig(width=64, heads=4, layers=2),
            geometry=GeometryConfig(num_layers=2, num_heads=4, dim_feedforward=128),
            encoder=EncoderConfig(num_layers=2, num_heads=4, dim_feedforward=128),
            decoder=DecoderConfig(num_layers=3, num_queries=16, num_heads=4, dim_feedforward=128, scoring_mlp_dim=128),
            seg=SegHeadConfig(num_heads=4),
        )

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of ``dataclasses.asdict`` (as stored in a checkpoint manifest)."""
        return _from_dict(cls, d)


def _from_dict(cls, d):
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value = d[f.name]
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            value = _from_dict(factory, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)
