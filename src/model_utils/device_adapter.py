"""Rank identity of the running job. Ranks and devices come from the environment alone (`local_adapter`:
msrun, a legacy rank table or one process), on ModelArts / OpenI too, where the platform starts the same
launchers; only the job id differs there (the platform's JOB_ID, `moxing_adapter.get_job_id`)."""
from typing import Any

from . import local_adapter, moxing_adapter
from .local_adapter import get_device_id, get_device_num, get_rank_id

__all__ = ["get_device_id", "get_device_num", "get_rank_id", "get_job_id"]


def get_job_id(config: Any = None) -> str:
    """The platform's job id with ``enable_modelarts``, else the local one."""
    return (moxing_adapter if getattr(config, "enable_modelarts", False) else local_adapter).get_job_id()
