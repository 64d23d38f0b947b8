"""An inference session over a route: one RemoteSpanSession per hop, stepped in order."""

from __future__ import annotations

import torch
import trio
from libp2p.abc import IHost

from petald.kernels.model_source import ModelIdentity
from petald.p2pnode.remote_span import RemoteSpanSession
from petald.p2pnode.route import SpanRoute


class InferenceSession:
    def __init__(self, host: IHost, route: SpanRoute, identity: ModelIdentity, batch: int, max_length: int,
                 wire_dtype: str = "float32", codec: str = "raw", step_timeout: float = 120.0):
        self.host, self.route, self.identity = host, route, identity
        self.batch, self.max_length = batch, max_length
        self.wire_dtype, self.codec, self.step_timeout = wire_dtype, codec, step_timeout
        self.spans: list[RemoteSpanSession] = []
        self.position = 0

    async def open(self) -> None:
        try:
            for hop in self.route.hops:
                self.spans.append(await RemoteSpanSession.open(
                    self.host, hop, self.identity, self.batch, self.max_length,
                    self.wire_dtype, self.codec, self.step_timeout))
        except BaseException:
            await self.close()
            raise

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``hidden`` [batch, tokens, hidden_size] through every hop; returns the last hop's output."""
        if self.position + hidden.shape[1] > self.max_length:
            raise ValueError(f"session holds {self.max_length} tokens; this step would reach "
                             f"{self.position + hidden.shape[1]}")
        for span in self.spans:
            hidden = await span.step(hidden)
        self.position += hidden.shape[1]
        return hidden

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            for span in self.spans:
                await span.close()
        self.spans = []
