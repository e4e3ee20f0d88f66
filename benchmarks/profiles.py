"""What each profile runs: image sizes, and the sweeps around one base case."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["PROFILES", "Case", "Profile"]


@dataclass(frozen=True)
class Case:
    """One tilefan job configuration on one image size."""

    megapixels: float
    chain: str = "neighbourhood"
    tile_size: int = 1024
    concurrency: int = 4
    encoding: str = "none"
    tiles_per_item: int = 4
    sweep: str = "size"
    """Which sweep put it in the run: size, chain, tile_size, concurrency or encoding."""

    def job(self) -> dict[str, Any]:
        """The fields a run needs."""
        return {
            "chain": self.chain,
            "tile_size": self.tile_size,
            "concurrency": self.concurrency,
            "encoding": self.encoding,
            "tiles_per_item": self.tiles_per_item,
        }

    def key(self) -> tuple[Any, ...]:
        """Identity of the job, whatever sweep asked for it."""
        return (self.megapixels, *self.job().values())


@dataclass(frozen=True)
class Profile:
    """A benchmark run: the size sweep, and the other sweeps on one image size."""

    name: str
    sizes_mp: tuple[float, ...]
    sweep_mp: float
    chains: tuple[str, ...] = ("point", "geometric")
    tile_sizes: tuple[int, ...] = (512, 2048)
    concurrencies: tuple[int, ...] = (1, 2, 8)
    encodings: tuple[str, ...] = ("lzw", "deflate")
    memory: tuple[tuple[float, int], ...] = ()
    """(megapixels, tile_size) pairs measured stage by stage in separate processes."""
    kernel_tile_sizes: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    kernel_samples: int = 3
    base: Case = field(default_factory=lambda: Case(0))
    dask: bool = True

    def cases(self) -> list[Case]:
        """Every tilefan job of the run, each once, size sweep first."""
        base = replace(self.base, megapixels=self.sweep_mp)
        cases = [replace(self.base, megapixels=size, sweep="size") for size in self.sizes_mp]
        cases += [replace(base, chain=chain, sweep="chain") for chain in self.chains]
        cases += [replace(base, tile_size=size, sweep="tile_size") for size in self.tile_sizes]
        cases += [
            replace(base, concurrency=workers, sweep="concurrency")
            for workers in self.concurrencies
        ]
        cases += [replace(base, encoding=name, sweep="encoding") for name in self.encodings]
        unique: dict[tuple[Any, ...], Case] = {}
        for case in cases:
            unique.setdefault(case.key(), case)
        return list(unique.values())


PROFILES: dict[str, Profile] = {
    # A few megapixels: checks that every part runs and writes every field (the smoke test).
    "smoke": Profile(
        name="smoke",
        sizes_mp=(2,),
        sweep_mp=2,
        chains=(),
        tile_sizes=(),
        concurrencies=(),
        encodings=(),
        memory=((2, 512),),
        kernel_tile_sizes=(256, 512),
        kernel_samples=1,
        base=Case(0, tile_size=512, concurrency=2),
    ),
    # The default: trends on small images, under about 15 minutes on a 2-core machine.
    "quick": Profile(
        name="quick",
        sizes_mp=(16, 36, 64),
        sweep_mp=16,
        tile_sizes=(256, 512, 2048),
        memory=((16, 1024), (64, 1024), (16, 512), (16, 2048)),
        kernel_samples=2,
    ),
    # The targets' sizes: 100 MP to 1 GP. An hour or more on a 2-core machine.
    "full": Profile(
        name="full",
        sizes_mp=(100, 250, 500, 1000),
        sweep_mp=100,
        tile_sizes=(512, 2048, 4096),
        concurrencies=(1, 2, 8),
        memory=((100, 1024), (500, 1024), (1000, 1024), (100, 512), (100, 2048), (100, 4096)),
    ),
}
