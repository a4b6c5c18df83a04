"""What a run measures and how much: sizes, repetitions, durations, and the scenarios.

Every field of :class:`Config` but ``profile`` is a command-line option of the same name
(``--layer-mib``...); :data:`HELP` is its help text. ``--quick`` starts from
:meth:`Config.quick` instead of the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    layers: int = 3
    layer_mib: float = 64
    big_mib: float = 1024
    concurrent: int = 16
    cold_repeats: int = 3
    warm_repeats: int = 3
    conc_repeats: int = 3
    single_repeats: int = 1
    wrk_seconds: float = 3
    blob_wrk_seconds: float = 5
    wrk_rounds: int = 3
    connections: int = 16
    micro_lookups: int = 20_000
    profile: bool = True
    profile_seconds: float = 5
    recycle: bool = True
    """Free as much page cache as each cold measurement needs right before it
    (``bench.pagecache.recycle``); ``--no-recycle``: memory as found."""

    @classmethod
    def quick(cls) -> Config:
        return cls(
            layer_mib=4,
            big_mib=64,
            cold_repeats=1,
            warm_repeats=1,
            conc_repeats=1,
            wrk_seconds=1,
            blob_wrk_seconds=1,
            wrk_rounds=1,
            micro_lookups=2_000,
            profile_seconds=2,
        )


SCENARIOS = ("cold", "warm", "concurrent", "blob", "manifest", "single", "micro", "profile")
HELP = {
    "layers": "layers of the pull images",
    "layer_mib": "layer size of the pull images, MiB",
    "big_mib": "size of the single-layer big image, MiB",
    "concurrent": "concurrent cold pulls",
    "cold_repeats": "cold pulls per target, each of a fresh image",
    "warm_repeats": "warm pulls per target",
    "conc_repeats": "rounds of concurrent cold pulls, each of a fresh image",
    "single_repeats": "cold then warm GETs of the single blobs per target, each of a fresh blob",
    "wrk_seconds": "duration of one wrk run on a manifest endpoint",
    "blob_wrk_seconds": "duration of one wrk run on the blob endpoint",
    "wrk_rounds": "wrk runs per target and endpoint (interleaved)",
    "connections": "wrk connections",
    "micro_lookups": "look-ups per descriptor micro-benchmark",
    "profile_seconds": "duration of each profiled wrk run",
}
