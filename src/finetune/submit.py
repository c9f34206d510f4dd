"""Submit the compiled pipeline (pipelines/finetune_pipeline.yaml) to a Kubeflow Pipelines API through kfp.Client."""

from typing import Any

from .config import apply_overrides, config_from_dict, drop_none


class SubmitError(RuntimeError):
    pass


def build_arguments(params: dict[str, Any], args: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Pipeline arguments: explicit ``--arg name=value`` plus, when ``--set`` was used, the whole params dict."""
    arguments = dict(args)
    if overrides:
        merged = apply_overrides(params, overrides)
        config_from_dict(merged)  # refuse bad values here, not minutes later on the cluster
        arguments["params"] = drop_none(merged)
    return arguments


def submit(host: str, package: str, experiment: str, arguments: dict[str, Any], run_name: str | None = None,
           namespace: str | None = None, existing_token: str | None = None,
           service_account: str | None = None):
    import kfp

    try:
        client = kfp.Client(host=host, namespace=namespace, existing_token=existing_token)
        return client.create_run_from_pipeline_package(package, arguments=arguments, run_name=run_name,
                                                       experiment_name=experiment, namespace=namespace,
                                                       service_account=service_account)
    except Exception as exc:  # urllib3/kfp_server_api/auth errors: the user needs host + reason, not a traceback
        raise SubmitError(f"cannot submit to the Kubeflow Pipelines API at {host}: {type(exc).__name__}: {exc}") from exc
