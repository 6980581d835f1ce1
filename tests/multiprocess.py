"""Run a function on several real processes joined by a gloo process group, for the tests.

Each rank runs ``fn(rank, world, *args)`` (a module-level function, so that ``spawn`` can
import it) and its JSON-able result comes back; a rank's exception comes back as its traceback
and fails the test with it.
"""

from __future__ import annotations

import importlib
import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, store: str, out: str, target: str, args: tuple) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        torch.set_num_threads(1)
        module, name = target.split(":")
        fn = getattr(importlib.import_module(module), name)
        result = fn(rank, world, *args)
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    except BaseException:
        Path(out, f"{rank}.json").write_text(json.dumps({"error": traceback.format_exc()}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Skip the interpreter's teardown: with torch 2.14's gloo it aborts ("terminate called
    # without an active exception") in about 1 run in 10, also in a minimal DDP script that
    # does not use adaptive_data. The results are written by now.
    os._exit(0)


def run(tmp_path: Path, world: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` processes; their results, by rank."""
    name = f"{fn.__name__}-{world}-{len(list(tmp_path.iterdir()))}"
    out = tmp_path / name
    out.mkdir()
    store = tmp_path / f"store-{name}"
    target = f"{fn.__module__}:{fn.__qualname__}"
    mp.start_processes(
        _worker,
        args=(world, str(store), str(out), target, args),
        nprocs=world,
        start_method="spawn",
    )
    results = [json.loads((out / f"{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(results):
        assert not (isinstance(res, dict) and "error" in res), f"rank {r}:\n{res['error']}"
    return results
