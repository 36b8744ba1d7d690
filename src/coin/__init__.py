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
    """Whether a Dask config file of the user's (the folders Dask reads) sets ``logging``: an environment variable
    outranks those files, so setting one would silently override the user's choice."""
    import glob
    import site
    import sys

    folders = [os.environ.get("DASK_ROOT_CONFIG", "/etc/dask"), os.path.join(sys.prefix, "etc", "dask"),
               *(os.path.join(p, "etc", "dask") for p in getattr(site, "PREFIXES", [])),
               os.path.join(os.path.expanduser("~"), ".config", "dask"), os.environ.get("DASK_CONFIG", "")]
    for folder in filter(None, folders):
        for path in glob.glob(os.path.join(folder, "*.y*ml")) if os.path.isdir(folder) else [folder]:
            try:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    if "logging" in fh.read():
                        return True
            except OSError:
                continue
    return False


# Dask's INFO lines (nannies starting, client connections, "pip install jupyter-server-proxy") were half of a
# pipeline's log; the workers inherit the variable too. DASK_LOGGING__DISTRIBUTED=info, or `logging:` in a Dask config
# file of one's own, keeps them
if "DASK_LOGGING__DISTRIBUTED" not in os.environ and not _dask_config_sets_logging():
    os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"

# bitsandbytes (which peft imports) warns on CPUs with AVX512-BF16 that an optional fused 4-bit kernel (the `kernels`
# package) is missing; coin keeps 4-bit layers off that kernel (coin.modeling.backbone._plain_cpu_4bit): noise here.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"))

__version__ = "0.1.0"
