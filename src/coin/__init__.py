"""CoIN: Contrastive Instruction Tuning as a workflow-orchestrated MLOps pipeline.

Importing the package keeps every tool local and quiet before any of them is imported:
telemetry/analytics off, Hugging Face offline (nothing is ever downloaded at run time).
A variable the user already set wins (``setdefault``).
"""

import logging
import os

LOCAL_ONLY_ENV = {
    "DO_NOT_TRACK": "true",                      # Prefect client, HF, MLflow (MLflow needs "true", not "1")
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the Prefect server otherwise posts usage events
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # the local (ephemeral) Prefect server: on two busy cores its start outlasted Prefect's 20 s, and the run ended
    # "Timed out while attempting to connect to ephemeral Prefect API server" before any work
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # MLflow's "Downloading artifacts" bar in `coin register` and the pipeline's log (copies of local files)
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
for _k, _v in LOCAL_ONLY_ENV.items():
    os.environ.setdefault(_k, _v)


def _dask_config_sets_logging() -> bool:
    """Whether the user set Dask's ``logging`` (a config file Dask reads, or a ``DASK_LOGGING...`` variable): an
    environment variable of coin's would outrank a file, and silently override the user's choice."""
    if any(k.startswith("DASK_LOGGING") for k in os.environ):
        return True
    try:
        import dask.config

        return any(isinstance(c, dict) and "logging" in c for c in dask.config.collect_yaml(dask.config.paths))
    except Exception:  # noqa: BLE001 -- no dask, or a config Dask itself will refuse: nothing to keep
        return False


def quiet_dask_logs() -> None:
    """Dask's INFO lines (nannies starting, client connections, "pip install jupyter-server-proxy") were half of a
    pipeline's log: warnings only, unless the user set Dask's logging (``DASK_LOGGING__DISTRIBUTED=info``, or
    ``logging:`` in a Dask config file of one's own). Set in the environment, so the workers inherit it. The flows
    call it when imported, before Dask is: reading Dask's config cost every ``coin`` command a third of its start."""
    if not _dask_config_sets_logging():
        os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"
        import dask.config  # read when dask was imported: again, with this variable

        dask.config.refresh()

# bitsandbytes (which peft imports) warns on CPUs with AVX512-BF16 that an optional fused 4-bit kernel (the `kernels`
# package) is missing; coin keeps 4-bit layers off that kernel (coin.modeling.backbone._plain_cpu_4bit): noise here.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"))

__version__ = "0.1.0"
