"""``[hosts]``: the supervision timings every plugin host shares. One type serves both sides: the kernel's config
validates the ``[hosts]`` table with it (unknown keys, bounds, descriptions), and the supervisor reads it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class HostSettings(BaseModel):
    """[hosts] supervision of plugin host processes (plugins with isolation = "process")."""

    # As the config's other sections (kernel.config.Section), and frozen: a running host's timings do not change.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True, frozen=True)

    heartbeat_interval_s: float = Field(default=0.5, gt=0, description="how often a host says it is alive")
    heartbeat_timeout_s: float = Field(default=10.0, gt=0, description="silence after which a host is killed")
    start_timeout_s: float = Field(default=60.0, gt=0,
                                   description="seconds a host may take to start and build plugins")
    restart_backoff_s: float = Field(default=1.0, ge=0,
                                     description="wait before the first restart; doubles per death")
    max_backoff_s: float = Field(default=30.0, ge=0, description="the longest wait between restarts")
    shutdown_timeout_s: float = Field(default=5.0, gt=0,
                                      description="wait after a shutdown request, then SIGTERM, SIGKILL")
    spin_us: float = Field(default=200.0, ge=0, description="a host busy-waits this long for the next call after each "
                           "answer (hook calls come in bursts); 0 sleeps at once")
    answer_spin_us: float = Field(default=150.0, ge=0,
                                  description="the kernel busy-reads this long for a host's answer before it sleeps "
                                              "until the answer comes (a small call's answer comes within it, and a "
                                              "sleeping thread takes tens of microseconds to wake); 0 sleeps at once")
