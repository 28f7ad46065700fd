"""Rank identity of the running job: the ModelArts adapter with `enable_modelarts`, else the local one.

The seed picked the adapter from a global config at import; here the config is passed in, and without one
the local adapter answers. Both only read the environment (see local_adapter), so the rank and device
numbers agree; they differ in the job id.
"""
from typing import Any

from . import local_adapter, moxing_adapter

__all__ = ["get_device_id", "get_device_num", "get_rank_id", "get_job_id"]


def _adapter(config: Any = None) -> Any:
    return moxing_adapter if getattr(config, "enable_modelarts", False) else local_adapter


def get_device_id(config: Any = None) -> int:
    return _adapter(config).get_device_id()


def get_device_num(config: Any = None) -> int:
    return _adapter(config).get_device_num()


def get_rank_id(config: Any = None) -> int:
    return _adapter(config).get_rank_id()


def get_job_id(config: Any = None) -> str:
    return _adapter(config).get_job_id()
