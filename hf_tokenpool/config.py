"""`TokenPoolConfig`: every pooling setting, in one place.

It is the single source of truth: `patch_model(model, keep=0.6)` builds one, the adapters read only
from it, and it travels inside `model.config.token_pooling` so that `save_pretrained` writes it into
`config.json` and `hf_tokenpool.from_pretrained` gets it back.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

METHODS = ("tokenpool", "kmeans", "tome", "topk")
OUTPUTS = ("mean", "medoid")
LOCATIONS = ("before_mlp", "after_layer")
METRICS = ("auto", "tokens", "keys")
LEGACY_DEFAULTS = {"pool_location": "after_layer", "metric": "tokens"}
CONFIG_KEY = "token_pooling"  # attribute of `model.config` (and key of config.json) that carries the settings


def default_pool_after(num_layers: int, num_steps: int = 3) -> list[int]:
    """Evenly spaced pooling points, as 0-based indices of the layers that pool (before their MLP by
    default, after the layer with pool_location="after_layer").

    12 layers -> after layers 3, 6 and 9 (1-based), i.e. [2, 5, 8]; 6 layers -> after 2, 3 and 5.
    """
    steps = min(num_steps, num_layers - 1)
    points = sorted({math.floor(num_layers * (i + 1) / (steps + 1) + 0.5) for i in range(steps)})
    return [p - 1 for p in points if 1 <= p < num_layers]


@dataclass
class TokenPoolConfig:
    keep: float = field(
        default=0.6,
        metadata={"help": "Fraction of the pool-able tokens kept at each pooling step, in (0, 1]. "
                  "For Swin: fraction of each window's tokens the pooled blocks compute on."},
    )
    method: str = field(default="tokenpool", metadata={"help": f"Reducer, one of {METHODS}."})
    pool_after: list[int] | None = field(
        default=None,
        metadata={"help": "0-based indices of the layers that pool (ViT/DeiT; where in the layer: pool_location). "
                  "Default: three evenly spaced depths (layers 3, 6, 9 of 12, 1-based)."},
    )
    schedule: list[float] | None = field(
        default=None,
        metadata={"help": "Explicit per-layer keep fractions, one per encoder layer (1.0 = no pooling after "
                  "that layer). Overrides keep/pool_after; e.g. pooling after every layer as in the paper."},
    )
    target_flops: float | None = field(
        default=None,
        metadata={"help": "FLOPs budget as a fraction of the plain model's FLOPs, in (0, 1]. patch_model "
                  "solves it into `keep` with torch's FLOP counter and records the result."},
    )
    proportional_attention: bool = field(
        default=True,
        metadata={"help": "Add log(size) to the attention logits of pooled tokens, so a token that stands "
                  "for s patches weighs like s patches (ToMe's proportional attention)."},
    )
    pool_location: str = field(
        default="before_mlp",
        metadata={"help": f"Where a pooling layer reduces its tokens (ViT/DeiT), one of {LOCATIONS}: between "
                  "attention and MLP (ToMe's place: the MLP already runs on the reduced tokens) or after the layer."},
    )
    metric: str = field(
        default="auto",
        metadata={"help": f"Clustering features of tokenpool and kmeans (ViT/DeiT), one of {METRICS}: the hidden "
                  "states, the attention keys averaged over heads (ToMe's metric, head_dim wide, cheaper), or auto: "
                  "the hidden states while a layer has no more tokens than channels, else the keys."},
    )
    iterations: int | None = field(
        default=None,
        metadata={"help": "Clustering update rounds after the start (tokenpool, kmeans); always run in full. 0: the "
                  "start and one assignment. None: the method's default (tokenpool 1, kmeans 5; docs/fidelity.md)."},
    )
    output: str = field(
        default="mean",
        metadata={"help": f"tokenpool output, one of {OUTPUTS}: significance-weighted cluster means or the medoids."},
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; accepted methods: {', '.join(METHODS)}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ValueError(f"keep must be a number in (0, 1] (the fraction of tokens kept), got {self.keep!r}")
        self.keep = float(self.keep)
        if self.target_flops is not None and not 0 < self.target_flops <= 1:
            raise ValueError(f"target_flops must be in (0, 1] (a fraction of the plain model's FLOPs), "
                             f"got {self.target_flops!r}")
        if self.schedule is not None:
            if (not isinstance(self.schedule, (list, tuple)) or not self.schedule
                    or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1 for s in self.schedule)):
                raise ValueError(f"schedule must be a non-empty list of per-layer keep fractions in (0, 1], "
                                 f"got {self.schedule!r}")
            self.schedule = [float(s) for s in self.schedule]
        if self.pool_after is not None:
            if (not isinstance(self.pool_after, (list, tuple)) or not self.pool_after
                    or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.pool_after)):
                raise ValueError(f"pool_after must be a non-empty list of 0-based layer indices, e.g. [2, 5, 8]; "
                                 f"got {self.pool_after!r}")
            self.pool_after = sorted(set(self.pool_after))
        if self.pool_location not in LOCATIONS:
            raise ValueError(f"unknown pool_location {self.pool_location!r}; accepted: {', '.join(LOCATIONS)}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; accepted: {', '.join(METRICS)}")
        if self.output not in OUTPUTS:
            raise ValueError(f"unknown output {self.output!r}; accepted: {', '.join(OUTPUTS)}")
        if self.iterations is not None and (isinstance(self.iterations, bool) or not isinstance(self.iterations, int)
                                            or self.iterations < 0):
            raise ValueError(f"iterations must be an integer >= 0 (0: the start and one assignment) or None (the "
                             f"method's default), "
                             f"got {self.iterations!r}")

    def reducer_options(self, names) -> dict:
        """The settings a reducer takes as keyword options (`names`), leaving out those left to the
        reducer's own default (None)."""
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def layer_keeps(self, num_layers: int) -> list[float]:
        """The resolved schedule: the keep fraction applied after each of `num_layers` layers."""
        if self.schedule is not None:
            if len(self.schedule) != num_layers:
                raise ValueError(f"schedule has {len(self.schedule)} entries but the encoder has {num_layers} "
                                 "layers: give one keep fraction per layer")
            return list(self.schedule)
        points = self.pool_after if self.pool_after is not None else default_pool_after(num_layers)
        if any(p >= num_layers for p in points):
            raise ValueError(f"pool_after={points} names a layer past the last one (the encoder has "
                             f"{num_layers} layers, indices 0..{num_layers - 1})")
        return [self.keep if i in points else 1.0 for i in range(num_layers)]

    @staticmethod
    def num_tokens(num_patches: int, keeps: list[float]) -> list[int]:
        """Pool-able tokens left after each layer: n -> round(n * keep), step by step."""
        counts, n = [], num_patches
        for keep in keeps:
            n = max(int(math.floor(n * keep + 0.5)), 0) if keep < 1 else n
            counts.append(n)
        return counts

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def from_dict(cls, data: dict) -> TokenPoolConfig:
        # Settings saved before pool_location and metric existed (hf_tokenpool 0.1) meant pooling after
        # the layer and clustering the hidden states: a saved model comes back as it was trained.
        data = {**LEGACY_DEFAULTS, **data} if "pool_location" not in data else dict(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown token pooling settings {sorted(unknown)}; accepted: {sorted(known)}")
        return cls(**data)
