"""Prompt templates, versioned in MLflow's prompt registry, and a sticky A/B split between two versions.

    from llmops_provider import prompts
    v = prompts.register(client_uri, "tiny-llama-complete", "Continue the docstring: {{text}}")
    prompts.set_alias(client_uri, "tiny-llama-complete", "canary", v)
    version, template = prompts.load(client_uri, "tiny-llama-complete", "champion")
    text = prompts.render(template, text="Return a list of")

A version is rolled out like a model version: alias ``canary`` for the candidate, ``champion``
for the stable one; :func:`assign` splits requests between them by a stable hash of a request or
user key, and the gateway records ``prompt_version`` in each feedback record, so
:func:`llmops_provider.feedback.negative_rate_by` compares the two (the A/B readout).
``mlflow`` is imported inside the functions: this module is light at DAG-parse time.
"""

from __future__ import annotations

import hashlib
import re

_VAR = re.compile(r"{{\s*([A-Za-z_][A-Za-z0-9_]*)\s*}}")


def _genai(tracking_uri: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.genai


def register(
    tracking_uri: str, name: str, template: str, commit_message: str | None = None, tags: dict[str, str] | None = None
) -> int:
    """Register ``template`` as a new version of prompt ``name``; an unchanged template returns its version."""
    genai = _genai(tracking_uri)
    latest = genai.load_prompt(name, allow_missing=True, link_to_model=False)
    if latest is not None and latest.template == template:
        return int(latest.version)
    return int(genai.register_prompt(name, template, commit_message=commit_message, tags=tags).version)


def set_alias(tracking_uri: str, name: str, alias: str, version: int) -> None:
    _genai(tracking_uri).set_prompt_alias(name, alias, int(version))


def load(tracking_uri: str, name: str, alias_or_version: str | int = "champion") -> tuple[int, str]:
    """(version, template) of an alias (``champion``, ``canary``) or a version number."""
    genai = _genai(tracking_uri)
    if isinstance(alias_or_version, int) or str(alias_or_version).isdigit():
        prompt = genai.load_prompt(name, version=int(alias_or_version), link_to_model=False)
    else:
        prompt = genai.load_prompt(f"prompts:/{name}@{alias_or_version}", link_to_model=False)
    return int(prompt.version), prompt.template


def render(template: str, **values: str) -> str:
    """Fill ``{{name}}`` placeholders; a missing value names the variable."""
    missing = sorted(set(_VAR.findall(template)) - set(values))
    if missing:
        raise KeyError(f"prompt template needs {missing}; pass them to render()")
    return _VAR.sub(lambda m: str(values[m.group(1)]), template)


def assign(key: str, canary_percent: int) -> str:
    """``canary`` or ``champion`` for a request/user ``key``: sticky, ``canary_percent`` of keys go to canary."""
    if not 0 <= canary_percent <= 100:
        raise ValueError(f"canary_percent {canary_percent} must be within 0-100")
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "canary" if bucket < canary_percent else "champion"
