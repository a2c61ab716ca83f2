"""The service's configs: `ServeConfig` (the application `args`: what needs new replicas) and `BatchConfig`
(the decoder's `user_config`: applied to running replicas by `Recommender.reconfigure`).

Replica counts, autoscaling, request limits per replica, queue bounds, health checks and actor resources are
Serve's own deployment options: they live in the `deployments:` section of the Serve config (serve.config.yaml),
where Serve applies them without restarting replicas (all but `ray_actor_options`). `DEFAULT_OPTIONS` holds
what the app builder binds when the config does not say.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nezha.config import ConfigError
from nezha.decoding import DECODERS
from nezha.live_catalog import DEFAULT_BATCH_MS, DEFAULT_FEED_MAXLEN, DEFAULT_PREFIX, REDIS_URL_ENV

ADMIN_TOKEN_ENV = "NEZHA_ADMIN_TOKEN"
RECOMMENDER = "Recommender"  # the deployment's name, as in the `deployments:` section

# Serve deployment options the builder binds; a `deployments:` entry of the Serve config overrides them.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    RECOMMENDER: {
        "num_replicas": 1,
        # Above BatchConfig.max_pending_requests: the replica itself turns away what is past its bound, with a
        # fast 503 `unavailable` in the API's envelope; the proxy's queue is a backstop only.
        "max_ongoing_requests": 256,
        "max_queued_requests": 64,
        "backpressure_config": {"retry_after_s": 1},  # the proxy's backstop 503 carries Retry-After too
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
        "ray_actor_options": {"num_cpus": 1},
    },
}


@dataclass
class BatchConfig:
    """How a replica groups requests (its `user_config`; changed without restarting replicas)."""

    max_batch_size: int = field(default=32, metadata={"help": "requests per batched decode call"})
    batch_wait_timeout_s: float = field(default=0.0, metadata={
        "help": "how long a batch that is not full waits for more requests (0: decode what waits; under load, "
                "requests arriving during a decode still form the next batch together)"})
    max_pending_requests: int = field(default=64, metadata={
        "help": "requests decoding or waiting on one replica; past it a fast 503 `unavailable` (retryable)"})

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_pending_requests < self.max_batch_size:
            raise ConfigError(f"max_pending_requests ({self.max_pending_requests}) must be >= max_batch_size "
                              f"({self.max_batch_size}), or no batch could fill")
        if self.batch_wait_timeout_s < 0:
            raise ConfigError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")


@dataclass
class ServeConfig:
    """The recommendation service's application args: model, catalog store, request limits."""

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
    max_batch_users: int = field(default=64, metadata={"help": "most users one POST /v1/recommend/batch may send"})
    max_body_bytes: int = field(default=65536, metadata={"help": "larger request bodies get 413"})
    redis_url: str | None = field(default=None, repr=False, metadata={
        "help": f"URL of the live catalog: redis[s]://, redis[s]+sentinel://, redis[s]+cluster:// "
                f"(else ${REDIS_URL_ENV}; neither: in-process)"})
    redis_prefix: str = DEFAULT_PREFIX
    feed_block_ms: int = field(default=500, metadata={"help": "follower's XREAD BLOCK timeout"})
    feed_batch_ms: int = field(default=DEFAULT_BATCH_MS, metadata={
        "help": "after a feed read that found changes, the follower waits this long before the next, so that "
                "a stream of changes is applied in batches (0: read again at once)"})
    feed_maxlen: int = DEFAULT_FEED_MAXLEN
    admin_token: str | None = field(default=None, repr=False, metadata={
        "help": f"bearer token of the catalog admin API (else ${ADMIN_TOKEN_ENV}; neither: admin API off)"})
    quantizer: str | None = field(default=None, metadata={
        "help": "quantizer.safetensors for text adds (default: the checkpoint's prepared dataset's)"})
    embedding_model: str | None = field(default=None, metadata={"help": "sentence-transformers folder for text adds"})
    request_timeout_s: float = field(default=5.0, metadata={
        "help": "how long a recommend or admin call may take before 504 (keep it below "
                "http_options.request_timeout_s, the proxy's own limit)"})
    retry_after_s: int = field(default=1, metadata={"help": "Retry-After of a 503 `unavailable` (seconds)"})

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
        if self.request_timeout_s <= 0:
            raise ConfigError("request_timeout_s must be > 0")
        for name in ("max_history_items", "max_batch_users", "max_body_bytes", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.feed_batch_ms < 0:
            raise ConfigError(f"feed_batch_ms must be >= 0, got {self.feed_batch_ms}")

    def resolved(self) -> ServeConfig:
        """Absolute checkpoint path; secrets from the environment where the config leaves them out."""
        return dataclasses.replace(
            self, checkpoint=str(Path(self.checkpoint).expanduser().resolve()),
            redis_url=self.redis_url or os.environ.get(REDIS_URL_ENV) or None,
            admin_token=self.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None)
