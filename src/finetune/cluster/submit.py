"""Submit the compiled pipeline (pipelines/finetune_pipeline.yaml) to a Kubeflow Pipelines API through kfp.Client."""

from pathlib import Path
from typing import Any

import kfp
import yaml

from finetune.common.coercion import located_error
from finetune.common.params import as_params, load_config


class SubmitError(RuntimeError):
    pass


def build_arguments(params_file: str | Path, overrides: list[str], args: list[str],
                    package: str | Path) -> dict[str, Any]:
    """The run's arguments: ``params`` (the whole config resolved from ``params_file`` and the overrides) plus the
    per-run parameters the compiled ``package`` declares. ``--arg`` with a dotted name is a config override, the
    same channel as ``--set``; a config value never travels twice."""
    per_run_names = _per_run_parameters(package)
    per_run, dotted = {}, list(overrides)
    for item in args:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise located_error(f"--arg {item!r} is not of the form NAME=VALUE")
        if "." in name:
            dotted.append(item)
        elif name in per_run_names:
            per_run[name] = value  # all per-run parameters are strings: an md5 like 12e4... stays one
        else:
            raise located_error(f"--arg {name}: not a per-run parameter of {package} ({', '.join(per_run_names)}); "
                              f"config values go through --set SECTION.KEY=VALUE, e.g. --set train.epochs=3")
    return {**per_run, "params": as_params(load_config(params_file, dotted))}


def _per_run_parameters(package: str | Path) -> list[str]:
    try:
        spec = next(yaml.safe_load_all(Path(package).read_text(encoding="utf-8")))
        names = spec["root"]["inputDefinitions"]["parameters"]
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration) as exc:
        raise SubmitError(f"{package}: not a compiled pipeline spec ({type(exc).__name__}: {exc}); "
                          f"run `finetune pipeline compile`") from None
    return sorted(set(names) - {"params"})


def submit(host: str, package: str, experiment: str, arguments: dict[str, Any], run_name: str | None = None,
           namespace: str | None = None, existing_token: str | None = None,
           service_account: str | None = None):

    try:
        client = kfp.Client(host=host, namespace=namespace, existing_token=existing_token)
        return client.create_run_from_pipeline_package(package, arguments=arguments, run_name=run_name,
                                                       experiment_name=experiment, namespace=namespace,
                                                       service_account=service_account)
    except Exception as exc:  # urllib3/kfp_server_api/auth errors: the user needs host + reason, not a traceback
        raise SubmitError(f"cannot submit to the Kubeflow Pipelines API at {host}: {type(exc).__name__}: {exc}") from exc
