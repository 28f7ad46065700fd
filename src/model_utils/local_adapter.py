"""Rank identity of a local run (msrun, rank table or a single process), read from the environment only.

`mindspore.communication.init()` fails unless the process was started by msrun, so nothing here calls it:
msrun exports RANK_ID / RANK_SIZE / DEVICE_ID (and MS_NODE_ID / MS_WORKER_NUM / MS_ROLE), the legacy
Ascend rank-table scripts export RANK_ID / RANK_SIZE / DEVICE_ID / RANK_TABLE_FILE.
"""
import json
import os


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def get_device_id() -> int:
    """Device of this process (msrun: the local rank; rank table: the physical device id)."""
    return _env_int(("DEVICE_ID",), 0)


def get_device_num() -> int:
    """Number of training processes of the job (the seed name for the world size)."""
    return _env_int(("RANK_SIZE", "MS_WORKER_NUM"), 1)


def get_rank_id() -> int:
    """Global rank of this process. A multi-node msrun job without --node_rank exports RANK_ID only
    after `init()`; before that every process reads 0, so rank-0-only work belongs after `init()`."""
    return _env_int(("RANK_ID", "MS_NODE_ID"), 0)


def get_job_id() -> str:
    return "Local Job"


def is_scheduler() -> bool:
    """msrun also runs the script as the cluster scheduler (MS_ROLE=MS_SCHED, RANK_ID=0); it trains nothing
    and must not download or upload anything."""
    return os.environ.get("MS_ROLE") == "MS_SCHED"


def _local_rank_from_rank_table(path: str, rank_id: int) -> int | None:
    # Rank table v1.0: server_list[].device[].rank_id. The devices of a node need not start at 0
    # (a 4-card job may use devices 4-7), so the local rank is the position among the node's ranks.
    try:
        with open(path, encoding="utf-8") as f:
            servers = json.load(f)["server_list"]
        for server in servers:
            ranks = sorted(int(device["rank_id"]) for device in server["device"])
            if rank_id in ranks:
                return ranks.index(rank_id)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def get_local_rank() -> int:
    """Index of this process among the processes of its node; local rank 0 does the per-node downloads."""
    if "MS_WORKER_NUM" in os.environ or "MS_ROLE" in os.environ:
        return get_device_id()  # msrun exports the local rank as DEVICE_ID
    table = os.environ.get("RANK_TABLE_FILE", "")
    if table and os.environ.get("RANK_ID", "").strip():
        local_rank = _local_rank_from_rank_table(table, get_rank_id())
        if local_rank is not None:
            return local_rank
    return get_device_id()
