"""The `modelfleet` console script: `check` talks to a running server (deployments/check.py); `doctor`
and `fetch` prepare a machine (loading/cli.py); `validate` checks a config as `serve run` does, and nothing
else (`make serve` runs it first: `serve run` answers a config it refuses with Ray's tracebacks, and then
blocks). Each is imported only when asked for, so `modelfleet check` starts without torch.

`doctor` and `fetch` first check each application of the config that this project builds (import_path
deployments.builder:build_app) the way `serve run` does (AppConfig: no unknown field, at least one model):
loading reads only `args.models` and `args.local_models_dir`, and knows nothing of the rest of `args`."""

from __future__ import annotations

import sys
from difflib import get_close_matches
from pathlib import Path
from typing import Any

CHECK_USAGE = ("modelfleet check [--url URL] [--api-key KEY] [--json] [--timeout S]: "
               "every family of a running server answers a real request (see `modelfleet check --help`)")
COMMANDS = ("check", "validate", "doctor", "fetch")
VALIDATE_USAGE = ("modelfleet validate [--config FILE]: the config's fields and API keys, as `serve run` checks "
                  "them (no model is looked for: that is `modelfleet doctor`)")


def check_serve_config(path: Path, with_keys: bool = False) -> None:
    """Raise loading's ServeConfigError (`modelfleet doctor|fetch` exit 2 with it) for a config that `serve run`
    refuses: an application of ours whose `args` AppConfig refuses, or no application of ours. A file that is no
    Serve config at all (bad YAML, not a mapping) is left to loading, which says so. `with_keys`: also the API and
    admin keys as the builder reads them, from this process's environment (`modelfleet validate`, run where
    `serve run` starts Ray; doctor and fetch may run elsewhere)."""
    import yaml
    from pydantic import ValidationError

    from loading.config import BUILDER_IMPORT_PATHS, ServeConfigError

    try:
        data: Any = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    if data is None:
        data = {}
    if not isinstance(data, dict) or not isinstance(applications := data.get("applications", []), list):
        return
    ours = [(index, app) for index, app in enumerate(applications)
            if isinstance(app, dict) and app.get("import_path") in BUILDER_IMPORT_PATHS]
    if not ours:
        raise ServeConfigError(
            f"{path}: no application has import_path: {BUILDER_IMPORT_PATHS[0]}, so nothing that `serve run` would "
            "serve of this project is there to check; add one (see serve_config.yaml)")
    try:
        from .app_config import AppConfig
    except ImportError as exc:  # the serving side (Ray) is not installed here: loading checks what it reads
        print(f"modelfleet: note: the applications' `args` were not checked as `serve run` checks them "
              f"(cannot import deployments.app_config: {exc})", file=sys.stderr)
        return
    problems = []
    for index, app in ours:
        args = app.get("args") or {}
        if not isinstance(args, dict):
            continue  # loading refuses it, naming it
        try:
            config = AppConfig.model_validate(args)
        except ValidationError as exc:
            problems += [f"applications[{index}].args{_where(error['loc'])}: {error['msg']}{_hint(error)}"
                         for error in exc.errors()]
            continue
        if with_keys:
            from .auth import AuthConfigError, load_admin_keys, load_keys

            try:  # build_app refuses these: a key file it cannot read, a key too short, no key with auth.required
                load_keys(config.auth)
                load_admin_keys(config.auth)
            except AuthConfigError as exc:
                problems.append(f"applications[{index}].args.auth: {exc}")
    if problems:
        raise ServeConfigError(f"{path}: " + "; ".join(problems)
                               + " (`serve run` refuses this config: fix the fields named)")


def _where(loc: tuple) -> str:
    """pydantic's location as the config spells it: .models[0].max_tokens."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def _hint(error: Any) -> str:
    """For a field that is not one: the field of that section it is nearest to, if any is near."""
    if error.get("type") != "extra_forbidden" or not error["loc"]:
        return ""
    fields = _fields_at(error["loc"][:-1])
    near = get_close_matches(str(error["loc"][-1]), fields, n=1, cutoff=0.75)
    return f" (did you mean `{near[0]}`?)" if near else ""


def _fields_at(loc: tuple) -> list[str]:
    """The field names of the model at `loc` inside AppConfig (none where it is not a model)."""
    from .app_config import AppConfig

    model: Any = AppConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> Any:
    """The pydantic model an annotation holds (list[M], M | None, M), or None."""
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def validate(argv: list[str]) -> int:
    """`modelfleet validate`: 0 for a config `serve run` takes (as far as its fields go), 2 naming each field it
    refuses. Reads no model and asks no Hub, so it answers in a second or two."""
    import argparse

    from loading.cli import config_file_problem
    from loading.config import ServeConfigError, apps_from_serve_config

    parser = argparse.ArgumentParser(prog="modelfleet validate", description=VALIDATE_USAGE.split(": ", 1)[1])
    parser.add_argument("--config", type=Path, default=Path("serve_config.yaml"), help="Serve config file")
    args = parser.parse_args(argv)
    if (problem := config_file_problem(args.config)) is not None:
        print(problem, file=sys.stderr)
        return 2
    try:
        check_serve_config(args.config, with_keys=True)
        apps = apps_from_serve_config(args.config)  # bad YAML, not a Serve config: loading's words for it
    except ServeConfigError as exc:
        print(f"modelfleet validate: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: valid ({len(apps)} application(s) of modelfleet, "
          f"{sum(len(app.models) for app in apps)} model(s))")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"]:
        from .check import main as check

        return check(argv[1:])
    if argv[:1] == ["validate"]:
        return validate(argv[1:])
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:  # loading's parser knows only doctor, fetch
        near = get_close_matches(argv[0], COMMANDS, n=1)
        print(f"modelfleet: unknown command {argv[0]!r}" + (f" (did you mean `{near[0]}`?)" if near else "")
              + f": the commands are {', '.join(COMMANDS)} (see `modelfleet --help`)", file=sys.stderr)
        return 2
    from loading.cli import main as loading_main

    if argv[:1] in ([], ["-h"], ["--help"]):  # loading's help knows doctor and fetch: name check and validate too
        try:
            return loading_main(argv)
        finally:
            print(f"\nalso: {CHECK_USAGE}\n      {VALIDATE_USAGE}", file=sys.stdout if argv else sys.stderr)
    return loading_main(argv, check_config=check_serve_config)


if __name__ == "__main__":
    sys.exit(main())
