"""Model hyperparameters: one frozen, validated config per detector, stored in its manifest.

The four hyperparameters that matter most are `code_size`, depth and width (`hidden`, one entry
per layer; for `conv` backbones the channel counts), and the reconstruction `loss`. The rest
belong to one kind each and are ignored by the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from pipeline.errors import ConfigError

__all__ = [
    "ACTIVATIONS",
    "BACKBONES",
    "CORRUPTIONS",
    "LOSSES",
    "MODEL_KINDS",
    "ModelConfig",
]

MODEL_KINDS = ("undercomplete", "denoising", "sparse", "contractive", "vae", "pca")
BACKBONES = ("dense", "conv")
LOSSES = ("mse", "l1", "bce")
ACTIVATIONS = ("relu", "tanh", "gelu", "elu", "linear")
CORRUPTIONS = ("gaussian", "mask", "saltpepper")
SPARSITY_PENALTIES = ("l1", "kl")
VAE_SCORES = ("reconstruction", "elbo")


@dataclass(frozen=True)
class ModelConfig:
    """What to build. `input_shape` is (window, features) for series, (C, H, W) for images;
    left empty in training settings, it is filled in from the data."""

    kind: str = "undercomplete"
    backbone: str = "dense"
    input_shape: tuple[int, ...] = ()
    hidden: tuple[int, ...] = (64, 32)
    code_size: int = 8
    loss: str = "mse"
    activation: str = "relu"
    # denoising: corruption applied to training inputs only; the target stays clean
    corruption: str = "gaussian"
    corruption_level: float = 0.1
    # sparse: L1 on code activations, or KL divergence of their mean to a target rate
    sparsity: str = "l1"
    sparsity_weight: float = 1e-3
    sparsity_target: float = 0.05
    # contractive: weight of the squared Frobenius norm of the encoder Jacobian
    contractive_weight: float = 1e-3
    # vae: KL weighted by beta per input element against the mean reconstruction error; the
    # anomaly score is reconstruction error or the negative ELBO
    beta: float = 0.1
    vae_score: str = "reconstruction"

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        _choice("kind", self.kind, MODEL_KINDS)
        _choice("backbone", self.backbone, BACKBONES)
        _choice("loss", self.loss, LOSSES)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("corruption", self.corruption, CORRUPTIONS)
        _choice("sparsity", self.sparsity, SPARSITY_PENALTIES)
        _choice("vae_score", self.vae_score, VAE_SCORES)
        # An empty input_shape means "taken from the data later" (see with_input_shape).
        if self.input_shape and (len(self.input_shape) not in (2, 3) or min(self.input_shape) < 1):
            raise ConfigError(
                "input_shape", f"need (window, features) or (C, H, W), got {self.input_shape}"
            )
        if self.code_size < 1:
            raise ConfigError("code_size", f"must be >= 1, got {self.code_size}")
        if any(h < 1 for h in self.hidden):
            raise ConfigError("hidden", f"layer widths must be >= 1, got {self.hidden}")
        if self.kind == "pca":
            if self.backbone != "dense":
                raise ConfigError("backbone", "pca is linear: it takes no conv backbone")
            if self.input_shape and self.code_size > self.n_inputs:
                raise ConfigError("code_size", f"pca needs code_size <= {self.n_inputs} inputs")
        elif not self.hidden and self.backbone == "conv":
            raise ConfigError("hidden", "a conv backbone needs at least one layer of channels")
        if not 0.0 <= self.corruption_level <= (1.0 if self.corruption != "gaussian" else 10.0):
            raise ConfigError("corruption_level", f"out of range: {self.corruption_level}")
        if not 0.0 < self.sparsity_target < 1.0:
            raise ConfigError("sparsity_target", f"must be in (0, 1), got {self.sparsity_target}")
        for name in ("sparsity_weight", "contractive_weight", "beta"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def n_inputs(self) -> int:
        n = 1
        for d in self.input_shape:
            n *= d
        return n

    @property
    def code_activation(self) -> str:
        """KL sparsity needs code activations in (0, 1); every other code is linear."""
        return "sigmoid" if self.kind == "sparse" and self.sparsity == "kl" else "linear"

    @property
    def output_activation(self) -> str:
        return "sigmoid" if self.loss == "bce" else "linear"

    def with_input_shape(self, shape: tuple[int, ...]) -> ModelConfig:
        return replace(self, input_shape=tuple(shape))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError("model", f"unknown settings {unknown}")
        values = dict(data)
        for name in ("input_shape", "hidden"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(name, f"unknown value {value!r}; choose one of {', '.join(allowed)}")
