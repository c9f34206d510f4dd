"""serve: the verified model behind HTTP (src/finetune/serving/): config and paths in, a running server out.

Not a dvc stage: `finetune serve --model models:/<name>@champion` runs until SIGTERM.
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune.common import tracking
from finetune.common.config import Config
from finetune.registry.request import RegistryError
from finetune.serving.model import ServeError
from finetune.serving.server import ServerState, serve
from finetune.stages import StageFailed

TOKEN_FILE_ENV = "FINETUNE_SERVE_TOKEN_FILE"


def read_token(token_file: str | None) -> str | None:
    """The bearer token from ``token_file`` (or the file $FINETUNE_SERVE_TOKEN_FILE names); None = no token.
    The message of a refusal names the file, never its content."""
    path = token_file or os.environ.get(TOKEN_FILE_ENV)
    if not path:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise StageFailed(f"{path}: cannot read the bearer token file ({type(exc).__name__})") from None
    if not token or any(c.isspace() for c in token):
        raise StageFailed(f"{path}: the bearer token file must hold one token (no spaces), not empty")
    return token


def run_serve(cfg: Config, model: str | None, host: str, port: int, token_file: str | None = None) -> None:
    """Serve ``model`` (default: the champion of register.model_name) until SIGTERM; a model that cannot be
    loaded or verified is one line and StageFailed."""
    model = model or f"models:/{cfg.register.model_name}@champion"
    token = read_token(token_file)
    uri = None
    if model.startswith("models:/"):
        uri = tracking.configure(".")[0]
        tracking.require_reachable(uri)  # fail fast when the registry is down, not after MLflow's retries
    state = ServerState(cfg=cfg.serve, spec=model, tracking_uri=uri, token=token)
    try:
        serve(state, host, port)
    except (ServeError, RegistryError) as exc:
        raise StageFailed(str(exc)) from None
