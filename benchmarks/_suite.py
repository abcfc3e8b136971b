"""Types shared by the benchmark modules, the runner and the report."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ._peers import AsyncPeer, SyncPeer

T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    quick: bool = False

    def pick(self, full: T, quick: T) -> T:
        return quick if self.quick else full


@dataclass(frozen=True)
class Metric:
    key: str
    unit: str
    higher_is_better: bool = False
    size: int | None = None  # payload size in bytes, for the payload plot
    #: for ``plot="lines"``: the x value (say, the number of workers) and the line it belongs to
    x: float | None = None
    series: str = ""


#: one repeat of one peer: metric key -> figure (a missing key means "not measured this repeat")
Figures = dict[str, float]


@dataclass(frozen=True)
class Bench:
    name: str  # what ``--only`` takes
    title: str
    about: str  # one paragraph for the report
    metrics: Callable[[Config, str], Sequence[Metric]]  # (config, "sync" | "async")
    repeats: tuple[int, int]  # (full, quick)
    sync: Callable[[SyncPeer, Config, int], Figures] | None = None
    aio: Callable[[AsyncPeer, Config, int], Awaitable[Figures]] | None = None
    plot: str = "bars"  # or "payload", or "lines" (metrics with ``x`` and ``series``)
    #: run each peer once, untimed, before the first repeat (imports, per-program helpers)
    prime: bool = False
    #: why a peer does not take part (None: it does)
    skip: Callable[[SyncPeer | AsyncPeer], str | None] = lambda peer: None
    #: the sync rows, when they are not the usual pools (``_peers.sync_peers()``); a row's
    #: ``name`` is what the measuring function goes by
    peers: Callable[[], Sequence[SyncPeer]] | None = None
    #: the row that ratios divide by (None: the first nspool row) and the ratio column's name
    baseline: str | None = None
    ratio: str = "nspool advantage"
    #: rows in the report's summary tables (False where the rows are not the usual pools)
    summary: bool = True


@dataclass
class Table:
    """Figures of one front (sync or async) of one benchmark: peer -> metric -> per repeat."""

    kind: str
    metrics: Sequence[Metric]
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # peer -> why it has no figures
    errors: dict[str, list[str]] = field(default_factory=dict)
    leftovers: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    baseline_name: str | None = None  # None: the first nspool row
    ratio_label: str = "nspool advantage"

    @property
    def baseline(self) -> str | None:
        """The row ratios divide by: ``baseline_name`` if it has figures, else the first nspool
        entry with figures (ratios are then "nspool is this many times better")."""
        if self.baseline_name is not None:
            return self.baseline_name if self.baseline_name in self.values else None
        return next((p for p in self.values if p.startswith("nspool")), None)


@dataclass
class BenchResult:
    bench: Bench
    tables: list[Table]
    seconds: float
