"""The load levels of one HTTP benchmark run: the gateway row of each level and, for gateway-overhead, the direct row.

The ``Sides`` are the clients a run sends with; ``Levels`` runs every load level on them in turn.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleetserve.bench.gateway_client import GatewayClient, healthy_workers
from fleetserve.bench.http_report import compare, comparison_line, format_table, make_row
from fleetserve.bench.load import Load
from fleetserve.bench.traces import StreamTrace
from fleetserve.bench.worker_client import WorkerClient, stats_delta
from fleetserve.bench.workload import salted

if TYPE_CHECKING:
    from fleetserve.text.tokenizer import Tokenizer

Log = Callable[[str], None]


@dataclass
class Sides:
    """What one run sends with: the gateway client and, for gateway-overhead, the worker client and tokenizer."""

    gateway: GatewayClient
    direct: WorkerClient | None = None
    tokenizer: Tokenizer | None = None

    async def connect_worker(self, address: str, max_tokens: int, model: str, log: Log) -> dict[str, Any]:
        """Open the direct side on the worker at ``address`` and fetch its tokenizer; return what the result records."""
        self.direct = WorkerClient(address, max_tokens)
        self.tokenizer = await self.direct.fetch_tokenizer()
        info = {"address": address, "model": self.direct.model}
        info["tokenizer_fingerprint"] = self.direct.fingerprint
        if self.direct.model != model:
            log(f"warning: worker {address} serves {self.direct.model!r}, not {model!r}")
        return info

    async def warm_up(self) -> None:
        """One short request on each side; raise BenchError if one is refused."""
        await self.gateway.warm_up()
        if self.direct is not None and self.tokenizer is not None:
            await self.direct.warm_up(self.tokenizer)

    async def check_gateway(self, model: str, overhead: bool, log: Log) -> tuple[dict | None, int | None]:
        """The gateway's ``/ready`` body and its healthy workers for ``model``; warn when a comparison is unfair."""
        ready = await self.gateway.ready()
        healthy = healthy_workers(ready, model)
        if overhead and healthy != 1:
            log(
                f"warning: the gateway reports {healthy} healthy workers for {model}; the gateway-overhead "
                "comparison is fair only with --worker as its one worker"
            )
        return ready, healthy

    async def close(self) -> None:
        """Close the gateway side's idle connections and the direct side's channel, if there is one."""
        await self.gateway.close()
        if self.direct is not None:
            await self.direct.close()


@dataclass
class Levels:
    """Runs the load levels of one run: the same requests on the same sides, one level after another."""

    sides: Sides
    requests: list[list[dict]]
    max_tokens: int
    rng: random.Random
    timeout: float
    log: Log

    async def run_all(self, loads: Sequence[Load], salts: list[str | None]) -> tuple[list[dict], list[dict]]:
        """Every level in turn, each logged as a table; return (rows, gateway-overhead comparisons)."""
        rows: list[dict] = []
        comparisons: list[dict] = []
        for load in loads:
            level = await self.run(load, salts)
            rows += level
            self.log(format_table(level))
            if len(level) == 2:
                comparisons.append(compare(level[0], level[1]))
                self.log(comparison_line(comparisons[-1]))
            self.log("")
        return rows, comparisons

    async def run(self, load: Load, salts: list[str | None]) -> list[dict]:
        """One load level: the gateway row, then (gateway-overhead) the direct row; ``salts`` gives one tag a side."""
        rows = [await self._gateway_row(load, salts.pop())]
        if self.sides.direct is None or self.sides.tokenizer is None:
            return rows
        rows.append(await self._direct_row(load, salts.pop(), self.sides.direct, self.sides.tokenizer))
        return rows

    async def _gateway_row(self, load: Load, salt: str | None) -> dict:
        """The level's requests through the gateway over HTTP (with the worker's counters when there is a direct side)."""
        direct = self.sides.direct
        self.log(f"http {load.label}: {len(self.requests)} requests x {self.max_tokens} tokens ...")
        payloads = [salted(m, salt) for m in self.requests]
        traces = [StreamTrace(f"http-{load.label}-{i}", 0) for i in range(len(self.requests))]

        async def send_http(i: int, trace: StreamTrace) -> None:
            await self.sides.gateway.send(payloads[i], trace)

        before = await direct.stats() if direct else None
        wall = await load.drive(send_http, traces, self.rng)
        row = make_row(f"http {load.label}", "http", load, traces, wall, self.max_tokens)
        row["salt"] = salt
        if direct is not None and self.sides.tokenizer is not None:
            row["worker_stats"] = stats_delta(before, await direct.stats())
        return row

    async def _direct_row(self, load: Load, salt: str | None, direct: WorkerClient, tokenizer: Tokenizer) -> dict:
        """The level's requests straight to the worker over gRPC, tokenized before the clock starts."""
        self.log(f"grpc {load.label}: {len(self.requests)} requests x {self.max_tokens} tokens ...")
        ids = [tokenizer.encode_chat(salted(m, salt)) for m in self.requests]  # the worker alone is timed
        traces = [StreamTrace(f"grpc-{load.label}-{i}", len(p)) for i, p in enumerate(ids)]

        async def send_grpc(i: int, trace: StreamTrace) -> None:
            await direct.send(ids[i], trace, self.timeout)

        before = await direct.stats()
        wall = await load.drive(send_grpc, traces, self.rng)
        row = make_row(f"grpc {load.label}", "grpc", load, traces, wall, self.max_tokens)
        row["salt"] = salt
        row["worker_stats"] = stats_delta(before, await direct.stats())
        return row
