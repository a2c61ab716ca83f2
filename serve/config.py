"""ServeConfig: the one config of the recommendation service (`serve run serve.config.yaml` args)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nezha.config import ConfigError
from nezha.decoding import DECODERS
from nezha.live_catalog import DEFAULT_FEED_MAXLEN, DEFAULT_PREFIX, REDIS_URL_ENV

ADMIN_TOKEN_ENV = "NEZHA_ADMIN_TOKEN"


@dataclass
class ServeConfig:
    """The recommendation service: model, request limits, batching, catalog store, replicas."""

    checkpoint: str = field(default="runs/quickstart/train/best", metadata={"help": "checkpoint directory"})
    device: str = field(default="auto", metadata={"help": "auto (GPU when the replica has one), cpu, cuda"})
    dtype: str | None = field(default=None, metadata={"help": "override the checkpoint dtype (bfloat16 on GPUs)"})
    torch_threads: int = field(default=1, metadata={"help": "torch CPU threads per replica (0: torch default)"})
    decoders: list[str] = field(default_factory=lambda: list(DECODERS),
                                metadata={"help": "decoders offered (those the checkpoint has heads for)"})
    default_decoder: str = "nezha"
    beam: int = field(default=20, metadata={"help": "beam width of the search"})
    max_beam: int = field(default=64, metadata={"help": "widest search, used when k + excluded items > beam"})
    max_k: int | None = field(default=None, metadata={"help": "largest k a request may ask for (default: beam)"})
    max_history: int | None = field(default=None, metadata={
        "help": "history items the model sees (the last ones; default: the prepared dataset's max_history)"})
    max_history_items: int = field(default=200, metadata={"help": "longest history a request may send"})
    max_exclude: int = 200
    max_body_bytes: int = field(default=65536, metadata={"help": "larger request bodies get 413"})
    max_batch_size: int = field(default=32, metadata={"help": "requests per batched decode call"})
    batch_wait_timeout_s: float = field(default=0.005, metadata={"help": "how long a batch waits to fill"})
    redis_url: str | None = field(default=None, repr=False, metadata={
        "help": f"redis:// or rediss:// URL of the live catalog (else ${REDIS_URL_ENV}; neither: in-process)"})
    redis_prefix: str = DEFAULT_PREFIX
    feed_block_ms: int = field(default=500, metadata={"help": "follower's XREAD BLOCK timeout"})
    feed_maxlen: int = DEFAULT_FEED_MAXLEN
    admin_token: str | None = field(default=None, repr=False, metadata={
        "help": f"bearer token of the catalog admin API (else ${ADMIN_TOKEN_ENV}; neither: admin API off)"})
    quantizer: str | None = field(default=None, metadata={
        "help": "quantizer.safetensors for text adds (default: the checkpoint's prepared dataset's)"})
    embedding_model: str | None = field(default=None, metadata={"help": "sentence-transformers folder for text adds"})
    # Decoder replicas: passed to Serve as they are (same names and meaning as Serve's deployment options).
    autoscaling_config: dict[str, Any] = field(default_factory=lambda: {
        "min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}, metadata={
        "help": "Serve autoscaling_config of the decoder (forced to 1 replica without Redis)"})
    max_ongoing_requests: int = field(default=64, metadata={"help": "per decoder replica; > max_batch_size"})
    max_queued_requests: int = field(default=-1, metadata={
        "help": "requests a caller queues for the decoder before 503 (-1: unbounded)"})
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    ray_actor_options: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1}, metadata={
        "help": "per decoder replica, e.g. {num_cpus: 1, num_gpus: 1}; the replica decodes on its GPU if it has one"})
    ingress_replicas: int = 1
    ingress_max_ongoing_requests: int = field(default=1024, metadata={
        "help": "the ingress only awaits decoder replicas: keep it far above their total capacity"})
    ingress_num_cpus: float = 0.1
    ready_timeout_s: float = field(default=5.0, metadata={"help": "how long /readyz waits for a decoder replica"})
    request_timeout_s: float = field(default=5.0, metadata={
        "help": "how long a recommend or admin call waits for its decoder replica before 504 (keep it below "
                "http_options.request_timeout_s, the proxy's own limit)"})

    def __post_init__(self) -> None:
        unknown = [d for d in self.decoders if d not in DECODERS]
        if unknown:
            raise ConfigError(f"decoders: unknown {unknown}; choose from {list(DECODERS)}")
        if self.default_decoder not in self.decoders:
            raise ConfigError(f"default_decoder {self.default_decoder!r} is not in decoders {self.decoders}")
        if self.beam < 1 or self.max_beam < self.beam:
            raise ConfigError(f"need 1 <= beam <= max_beam, got beam {self.beam}, max_beam {self.max_beam}")
        self.max_k = self.beam if self.max_k is None else self.max_k
        if not 1 <= self.max_k <= self.max_beam:
            raise ConfigError(f"max_k must be in 1..max_beam ({self.max_beam}), got {self.max_k}")
        if self.request_timeout_s <= 0 or self.ready_timeout_s <= 0:
            raise ConfigError("request_timeout_s and ready_timeout_s must be > 0")
        for name in ("max_history_items", "max_batch_size", "max_body_bytes", "max_ongoing_requests",
                     "ingress_replicas", "ingress_max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def resolved(self) -> ServeConfig:
        """Absolute checkpoint path; secrets from the environment where the config leaves them out."""
        return dataclasses.replace(
            self, checkpoint=str(Path(self.checkpoint).expanduser().resolve()),
            redis_url=self.redis_url or os.environ.get(REDIS_URL_ENV) or None,
            admin_token=self.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None)
