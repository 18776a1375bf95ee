"""`modelfleet doctor` and `modelfleet fetch`: check and prepare a machine before serving."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch

from .config import ModelSpec, ServeApp, ServeConfigError, apps_from_serve_config, with_served_base
from .cpu_kernels import cpu_computes_bf16
from .errors import LoadingError
from .gguf import is_gguf_source
from .inspect_model import inspect_model
from .model_source import base_name, ensure_demo_model, find_base, resolve_model
from .offline import HubStatus, declared_offline, hub_status
from .placement import visible_gpus
from .quantization import bitsandbytes_status
from .resolve import fetch_destination, is_repo_id
from .settings import Settings

DEFAULT_CONFIG = "serve_config.yaml"


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def app_settings(settings: Settings, app: ServeApp) -> Settings:
    """The settings an application's replicas get: its `args.local_models_dir`, when set, is their
    LOCAL_MODELS_DIR (made absolute from the working directory, as the builder does)."""
    if app.local_models_dir is None:
        return settings
    return dataclasses.replace(settings, local_models_dir=app.local_models_dir.resolve())


def serving_apps(config: Path) -> list[ServeApp]:
    """The applications of a Serve config; ServeConfigError where none has a model: a config that serves no model
    is none that doctor or fetch can vouch for (it passed as "0 of 0 models can load.")."""
    apps = apps_from_serve_config(config)
    if not any(app.models for app in apps):
        where = "no application has `args.models`" if apps else "it has no `applications:`"
        raise ServeConfigError(f"{config}: no model to check: {where} (a list of at least one model, as `serve run` "
                               "requires)")
    return apps


def doctor(config: Path, out: TextIO | None = None) -> int:
    """Raises ServeConfigError, before printing anything, for a config that cannot be read."""
    out = out or sys.stdout  # looked up per call: a default bound at import ignores redirection
    apps = serving_apps(config)
    settings = Settings.from_env()
    hub = hub_status(settings)
    gpus = visible_gpus()
    bnb = bitsandbytes_status()
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p("== machine")
    p(f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}")
    p(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}")
    for gpu in gpus:
        p(f"GPU {gpu.index}: {gpu.name}, {_gib(gpu.free_bytes)} free of {_gib(gpu.total_bytes)}")
    if not gpus:
        p("GPUs: none visible (models load on CPU)")
    bf16 = ("native (AVX512-BF16/AMX): dtype bfloat16 computes with oneDNN-packed linears" if cpu_computes_bf16()
            else "emulated: bfloat16 on this CPU is slower than float32")
    p(f"CPU bf16: {bf16}")
    p(f"bitsandbytes: {bnb.message}")
    p(f"  native libraries: {', '.join(bnb.native_libraries) or 'none'}")
    p(f"Hub: {'online' if hub.online else 'OFFLINE'} ({hub.reason})")
    if not declared_offline() and not hub.online:
        p("  hint: set HF_HUB_OFFLINE=1 to make huggingface_hub skip its network retries")
    p(f"LOCAL_MODELS_DIR={settings.local_models_dir} ({'exists' if settings.local_models_dir.is_dir() else 'missing'})")
    p(f"HF cache: {settings.hf_hub_cache} (HF_HOME={settings.hf_home})")
    for warning in settings.warnings:
        p(f"WARNING: {warning}")

    specs = [(app, spec) for app in apps for spec in app.models]
    p(f"\n== models in {config} ({len(specs)})")
    failures = 0
    shown = None
    for app, spec in specs:
        app_env = app_settings(settings, app)
        if app.local_models_dir is not None and app is not shown:
            where = app_env.local_models_dir
            p(f"-- application {app.name!r}: args.local_models_dir={where} "
              f"({'exists' if where.is_dir() else 'missing'}), its LOCAL_MODELS_DIR")
        shown = app
        result = inspect_model(with_served_base(spec, app.models), app_env, hub, gpus)
        mark = "ok  " if result.ok else "FAIL"
        p(f"[{mark}] {spec.name}: {spec.source}")
        p(f"       location: {result.location}")
        if result.gguf:
            p(f"       gguf: {result.gguf}")
        if result.adapter_base:
            p(f"       adapter base: {result.adapter_base}")
        if result.family:
            p(f"       family: {result.family} ({result.model_class or 'detected on build'})")
        if result.parameters:
            p(f"       size: {result.parameters / 1e6:.2f} M parameters, ~{_gib(result.estimated_bytes)} as loaded")
        if result.strategy:
            p(f"       would load: {result.strategy}")
        for note in result.notes:
            p(f"       note: {note}")
        if result.error:
            failures += 1
            p("       error: " + result.error.replace("\n", "\n              "))
    p(f"\n{len(specs) - failures} of {len(specs)} models can load.")
    return 1 if failures else 0


def fetch(config: Path, to_local_dir: bool, out: TextIO | None = None) -> int:
    """Download every configured model (and convert every GGUF source) so that serving needs nothing more.
    An application's `args.local_models_dir` is its models' LOCAL_MODELS_DIR, as when it serves."""
    out = out or sys.stdout  # looked up per call: a default bound at import ignores redirection
    apps = serving_apps(config)
    settings = Settings.from_env()
    hub = hub_status(settings)
    specs = [(app, spec) for app in apps for spec in app.models]
    failures = 0
    for app, spec in specs:
        app_env = app_settings(settings, app)
        try:
            _fetch_one(with_served_base(spec, app.models), app_env, hub, to_local_dir, out)
        except LoadingError as exc:
            failures += 1
            print(f"[FAIL] {spec.name}: {exc}", file=out)
        except OSError as exc:  # a directory it must write to that is not one, not writable, or full
            failures += 1
            print(f"[FAIL] {spec.name}: {_write_failure(exc, app_env)}", file=out)
    print(f"{len(specs) - failures} of {len(specs)} models available locally.", file=out)
    return 1 if failures else 0


def _write_failure(exc: OSError, settings: Settings) -> str:
    """What a fetch whose files could not be written says: the path and why, where fetch writes, and the fix."""
    where = f" on {exc.filename}" if exc.filename else ""
    return (f"{type(exc).__name__}{where}: {exc.strerror or exc}. fetch writes models into "
            f"LOCAL_MODELS_DIR={settings.local_models_dir} (demo models, GGUF conversions, --local-models-dir) and "
            f"the HF cache {settings.hf_hub_cache} (downloads): make them writable directories with room, or point "
            "LOCAL_MODELS_DIR (or the app's args.local_models_dir) and HF_HOME elsewhere")


def _fetch_one(spec: ModelSpec, settings: Settings, hub: HubStatus, to_local_dir: bool, out: TextIO) -> None:
    if spec.build_tiny:
        ensure_demo_model(spec, settings)
    local_dir = fetch_destination(spec.source, settings) if to_local_dir and not is_gguf_source(
        spec.source) else None  # a GGUF is converted into LOCAL_MODELS_DIR anyway
    # Files only: downloads the model and an adapter's base where they are missing (config not needed);
    # converts a GGUF file that has no current conversion.
    found = resolve_model(spec, settings, hub=hub, local_dir=local_dir, with_base=False, with_config=False)
    base = base_name(found, spec)
    base_dir = fetch_destination(base, settings) if to_local_dir and is_repo_id(base) and not is_gguf_source(
        base) else None  # a Hub base goes beside the adapter, so that LOCAL_MODELS_DIR needs no HF cache
    found = find_base(found, spec, settings, hub=hub, local_dir=base_dir)
    print(f"[ok  ] {spec.name}: {found.path} ({found.resolved.origin})", file=out)
    if found.base is not None:
        print(f"       adapter base: {found.base.path} ({found.base.origin})", file=out)



def config_file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as the Serve config, or None: a directory given for the file (a shell's tab
    completion stops at one) is named as such, not reported 'not found' while it is there."""
    if path.is_file():
        return None
    if path.is_dir():
        return f"config file {path} is a directory: pass the YAML file in it (--config {path / DEFAULT_CONFIG})"
    return f"config file {path} not found (pass --config PATH)"

def main(argv: list[str] | None = None, check_config: Callable[[Path], None] | None = None) -> int:
    """`check_config`: called with the config file before doctor or fetch read it; a ServeConfigError it raises
    exits 2 with its message, as one of loading's own (the `modelfleet` console script checks there each
    application's whole `args`, which loading knows nothing of)."""
    parser = argparse.ArgumentParser(prog="modelfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("doctor", "check this machine and every configured model"),
                            ("fetch", "download every configured model (convert each GGUF file) to run offline")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG), help="Serve config file")
        if name == "fetch":
            cmd.add_argument("--local-models-dir", action="store_true",
                             help="download into LOCAL_MODELS_DIR/<Hub id> instead of the HF cache (an app's "
                                  "args.local_models_dir, where set, is its LOCAL_MODELS_DIR)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if (problem := config_file_problem(args.config)) is not None:
        print(problem, file=sys.stderr)
        return 2
    try:
        if check_config is not None:
            check_config(args.config)
        if args.command == "doctor":
            return doctor(args.config)
        return fetch(args.config, args.local_models_dir)
    except ServeConfigError as exc:  # bad YAML, a bad model entry, a name served twice: no traceback
        print(f"modelfleet {args.command}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. a setting read from the environment that is not a number
        print(f"modelfleet {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
