"""Run one pipeline (http endpoint at /api -> middleware -> backend) on a real port."""

from __future__ import annotations

import json
import textwrap

from tests.harness import MINIMAL_MAIN, start_harmony, write_config


def pipeline_config(middleware: dict[str, str], order: list[str] | None = None, *,
                    backend: str = 'service = "echo"', transforms_path: str | None = None) -> str:
    """TOML for one pipeline; *middleware* maps name -> the body of its table."""
    order = list(middleware) if order is None else order
    parts = [f"""
[pipelines.main]
networks = ["default"]
endpoints = ["api"]
middleware = {json.dumps(order)}
backends = ["be"]

[endpoints.api]
service = "http"
path_prefix = "/api"

[backends.be]
{backend}
"""]
    for name, body in middleware.items():
        parts.append(f"[middleware.{name}]\n{textwrap.dedent(body).strip()}\n")
    main = MINIMAL_MAIN
    if transforms_path is not None:
        main = main.replace("[proxy]", f'[proxy]\ntransforms_path = "{transforms_path}"', 1)
    return main, "\n".join(parts)


def start_pipeline(tmp_path, middleware, order=None, **kwargs):
    """Start Harmony with that pipeline; a Deferred firing with RunningHarmony
    (the caller stops it).  Fixtures wrap it in ``pytest_twisted.blockon``."""
    main, pipes = pipeline_config(middleware, order, **kwargs)
    path = write_config(tmp_path, main, {"main": pipes})
    return start_harmony(path)


def http_backend(url: str) -> str:
    return f'service = "http"\nbase_url = "{url}"\ntimeout_secs = 5'


def build_pipeline(tmp_path, middleware, **kwargs):
    """Build (not start) the runtime for that pipeline: where config is checked."""
    from harmony.config import load_config
    from harmony.runtime import build_runtime
    main, pipes = pipeline_config(middleware, **kwargs)
    return build_runtime(load_config(write_config(tmp_path, main, {"main": pipes})))


def assert_option_error(tmp_path, middleware, name: str, key: str, message: str, **kwargs) -> str:
    """Building must fail with a problem naming ``[middleware.NAME.options.KEY]`` and *message*."""
    import pytest
    from harmony.config import ConfigErrors
    with pytest.raises(ConfigErrors) as e:
        build_pipeline(tmp_path, middleware, **kwargs)
    text = e.value.render()
    assert f"[middleware.{name}.options.{key}]" in text and message in text, text
    return text
