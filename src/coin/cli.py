"""``coin``: one subcommand per pipeline stage, the whole pipeline, and ``predict``.

Every stage subcommand parses ``params.yaml`` first (bad keys stop the run before any work), then
calls the stage function in :mod:`coin.stages` -- the same function DVC and Prefect call.

    coin pairs                      # one stage, default params.yaml
    coin train --set train.max_steps=10
    coin pipeline                   # data -> pairs -> validate -> train -> evaluate -> register (Prefect flow)
    coin study                      # methods x seeds: mean ± std and paired differences with intervals (Prefect flow)
    coin predict --instruction "Is this review positive or negative?" --input "A gem." --task sst2
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

import coin  # noqa: F401  (sets the local-only environment first)
from coin.config import ConfigError, Settings, load_settings
from coin.data.io import DataError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
console = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (project root = its directory)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a key: section.key=value (repeatable)")]


def _settings(params: Path, overrides: list[str] | None) -> tuple[Settings, Path]:
    settings = load_settings(params, overrides)
    return settings, params.resolve().parent


def _fail(exc: BaseException) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False, emoji=False)
    raise typer.Exit(code=2)


def _run_stage(name: str, params: Path, overrides: list[str] | None) -> dict:
    from coin.stages import STAGES

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings, root = _settings(params, overrides)
        return STAGES[name](settings, root)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        _fail(exc)
    except RuntimeError as exc:  # GateFailed, NaN loss, ... carry their own explanation
        _fail(exc)
    raise AssertionError("unreachable")


def _print(result: dict) -> None:
    shown = {k: v for k, v in result.items() if k not in ("markdown", "table")}
    print(json.dumps(shown, indent=2, default=str))
    for key in ("markdown", "table"):
        if key in result:
            print(result[key])


def _stage_command(name: str):
    def command(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
        _print(_run_stage(name, params, set_))

    return command


def _register_stage_commands() -> None:
    """One subcommand per stage of :mod:`coin.stages`; its help is the stage function's summary line."""
    from coin.stages import STAGES

    for name, fn in STAGES.items():
        app.command(name=name, help=(fn.__doc__ or name).strip().split("\n")[0].replace("``", "`"))(_stage_command(name))


_register_stage_commands()


@app.command()
def pipeline(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Run every stage as a Prefect flow (data -> pairs -> validate -> train -> evaluate -> register)."""
    try:
        _, root = _settings(params, set_)  # fail on bad params before Prefect starts
    except ConfigError as exc:
        _fail(exc)
    sys.path.insert(0, str(root))
    from flows.pipeline import coin_pipeline

    try:
        result = coin_pipeline(params_path=str(params.resolve()), overrides=list(set_ or []))
    except (ConfigError, DataError, RuntimeError) as exc:
        _fail(exc)
    _print(result)


@app.command()
def study(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    sweep: Annotated[Optional[str], typer.Option(help="sweep one key: KEY=[v1,v2,...], e.g. train.lr=[5.0e-4,1.0e-3]")] = None,
    workers: Annotated[Optional[int], typer.Option(help="local Dask workers (default: study.workers, else one per GPU, "
                                                        "else one per 2 CPU cores)")] = None,
    dask_address: Annotated[Optional[str], typer.Option(help="an existing Dask scheduler, e.g. tcp://127.0.0.1:8786")] = None,
    dask_threads: Annotated[bool, typer.Option(help="one Dask worker thread in this process (needs --workers 1)")] = False,
) -> None:
    """Methods x training seeds [x one swept key]: train + evaluate each cell, then mean ± std and paired differences (Prefect flow).

    Runs the Prefect flow `coin-study` (as `coin pipeline` runs `coin-pipeline`): the same Dask fan-out,
    MLflow runs and artifacts whether started here or from a deployment. Done cells are skipped, so a
    killed study resumes by running the command again. One cell without Prefect or MLflow:
    `python -m coin.study.cell --method coin --seed 1`.
    """
    from coin.study.grid import load_study, sweep_overrides

    try:
        overrides = [*(set_ or []), *sweep_overrides(sweep)]
        _, root = load_study(params, overrides)  # fail on bad params (methods, seeds, sweep) before Prefect starts
    except ConfigError as exc:
        _fail(exc)
    sys.path.insert(0, str(root))
    from flows.study import coin_study

    try:
        result = coin_study(params_path=str(params.resolve()), overrides=overrides, workers=workers,
                            dask_address=dask_address, dask_processes=not dask_threads)
    except (ConfigError, DataError, RuntimeError) as exc:
        _fail(exc)
    _print(result)


@app.command()
def params(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Validate params.yaml and print the resolved settings."""
    try:
        settings, _ = _settings(params, set_)
    except ConfigError as exc:
        _fail(exc)
    print(json.dumps(settings.to_flat_dict(), indent=2))


@app.command()
def predict(
    instruction: Annotated[str, typer.Option(help="the instruction, e.g. \"Is this review positive or negative?\"")],
    input: Annotated[str, typer.Option("--input", help="the input text")] = "",
    task: Annotated[Optional[str], typer.Option(help="GLUE task: answer with its label words (loglik)")] = None,
    options: Annotated[Optional[str], typer.Option(help="candidate answers separated by '|'")] = None,
    model_uri: Annotated[Optional[str], typer.Option(help="default: models:/<register.model_name>@champion")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Answer an instruction + input with the registered champion (MLflow pyfunc)."""
    import mlflow
    import pandas as pd

    from coin.registry.tracking import setup_tracking

    try:
        settings, root = _settings(params, set_)
    except ConfigError as exc:
        _fail(exc)
    setup_tracking(settings, root)
    uri = model_uri or f"models:/{settings.register_.model_name}@champion"
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # noqa: BLE001 -- MLflow raises several types for a missing model
        hint = "Run `coin pipeline` (or `coin register`) first."
        if model_uri is None and "alias champion not found" in str(exc):
            hint = ("No candidate has passed the promotion gate yet (see `coin.promotion.reason` on its version, or "
                    "outputs/register/registration.json); the newest candidate is "
                    f"--model-uri models:/{settings.register_.model_name}@challenger.")
        _fail(RuntimeError(f"cannot load {uri}: {exc}. {hint}"))
    row = {"instruction": [instruction], "input": [input]}
    if task:
        row["task"] = [task]
    if options:
        row["options"] = [options]
    out = model.predict(pd.DataFrame(row), params={"return_scores": True})
    answer, scores = out["answer"].iloc[0], out["scores"].iloc[0]
    print(answer)
    if scores:
        console.print(f"[dim]scores (label log-likelihoods; calibrated if the model was trained with "
                      f"evaluate.calibration: content_free): {scores}[/]")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
