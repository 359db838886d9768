"""Prompt templates, versioned in MLflow's prompt registry, served by vLLM and rolled out like model versions.

A recipe's ``deployment.prompt`` names a chat template (:func:`resolve` registers the template
file as a new version when its text changed, or picks a version or an alias). The deploy stage
packages it next to the model and vLLM applies it server side (``--chat-template``), so a replica
is (model version, prompt version): a new prompt version on the same model version becomes a
canary/A-B candidate of the same rollout (``llmops_provider.rollout``), judged on the same
series narrowed by the ``prompt_version`` target label. Promotion moves the prompt alias
``champion`` (:func:`mark_promoted`); a rollback tags the prompt version (:func:`mark_rolled_back`).

    from llmops_provider import prompts
    v = prompts.register(client_uri, "tiny-llama-complete", "Continue the docstring: {{text}}")
    prompts.set_alias(client_uri, "tiny-llama-complete", "canary", v)
    version, template = prompts.load(client_uri, "tiny-llama-complete", "champion")
    text = prompts.render(template, text="Return a list of")

For a client-side template (rendered by the caller, not by vLLM), :func:`assign` splits requests
between the ``canary`` and ``champion`` aliases by a stable hash of a request or user key; the
gateway records ``prompt_version`` in each feedback record, so
:func:`llmops_provider.feedback.negative_rate_by` compares the two (the A/B readout).
``mlflow`` is imported inside the functions: this module is light at DAG-parse time.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------- served prompts

CHAMPION = "champion"
ROLLOUT_STATUS, ROLLOUT_EVIDENCE = "rollout_status", "rollout_evidence"  # == rollout.py's model-version tags


def template_path(spec, recipe_path: str | Path, home: str | Path) -> Path:
    """``deployment.prompt.template_file``: ``{home}`` expanded, relative to the recipe file."""
    path = Path(str(spec.template_file).replace("{home}", str(home)))
    return path if path.is_absolute() else Path(recipe_path).resolve().parent / path


def check_chat_template(template: str, where: str) -> None:
    """Fail naming ``where`` when vLLM could not compile the template (Jinja syntax), before any replica starts."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not template.strip():
        raise ValueError(f"{where}: the chat template is empty; write a Jinja template over `messages`")
    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"{where}: not a valid Jinja chat template (line {exc.lineno}: {exc.message})") from None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
    """Render a chat template as transformers/vLLM do (sandboxed Jinja, trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)


def resolve(tracking_uri: str, spec, recipe_path: str | Path, home: str | Path, tags: dict | None = None) -> dict:
    """The prompt version a recipe serves: ``{"name", "version", "template"}`` (version as a string).

    ``template_file``: registered as a new version when its text differs from the latest one
    (an unchanged file returns the latest version: re-running a deploy adds no version);
    ``version`` / ``alias``: that registered version. Fails naming the field.
    """
    if spec.template_file is not None:
        path = template_path(spec, recipe_path, home)
        if not path.is_file():
            raise ValueError(
                f"deployment.prompt.template_file: {path} does not exist; write the chat template there "
                "(relative paths are relative to the recipe file)"
            )
        template = path.read_text()
        check_chat_template(template, f"deployment.prompt.template_file ({path})")
        version = register(tracking_uri, spec.name, template, commit_message=f"from {path.name}", tags=tags)
        return {"name": spec.name, "version": str(version), "template": template}
    which = spec.version if spec.version is not None else spec.alias
    try:
        version, template = load(tracking_uri, spec.name, which)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types
        field = "version" if spec.version is not None else "alias"
        raise ValueError(
            f"deployment.prompt.{field}: prompt {spec.name!r} {field} {which!r} not found in MLflow's prompt "
            f"registry ({exc}); register it or use template_file"
        ) from None
    check_chat_template(template, f"deployment.prompt ({spec.name} v{version})")
    return {"name": spec.name, "version": str(version), "template": template}


def champion_version(tracking_uri: str, name: str) -> str | None:
    """The version the ``champion`` alias points at, or None."""
    try:
        return str(load(tracking_uri, name, CHAMPION)[0])
    except Exception:  # noqa: BLE001 - no alias yet
        return None


def mark_promoted(tracking_uri: str, name: str, version: str, rolled_out: bool) -> None:
    """``champion`` -> ``version``; tagged ``rollout_status=promoted`` when a canary/A-B decided it."""
    set_alias(tracking_uri, name, CHAMPION, int(version))
    if rolled_out:
        _genai(tracking_uri).set_prompt_version_tag(name, int(version), ROLLOUT_STATUS, "promoted")


def mark_rolled_back(tracking_uri: str, name: str, version: str, evidence: str) -> None:
    """Tag the prompt version ``rollout_status=rolled-back`` with the evidence; ``champion`` does not move."""
    genai = _genai(tracking_uri)
    genai.set_prompt_version_tag(name, int(version), ROLLOUT_STATUS, "rolled-back")
    genai.set_prompt_version_tag(name, int(version), ROLLOUT_EVIDENCE, evidence[:4900])


def served_render(endpoint: str, model: str, messages: list[dict], timeout: float = 60.0) -> str:
    """The prompt text the vLLM server renders for ``messages``: its chat template, via /tokenize + /detokenize."""
    import json
    import urllib.request

    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{endpoint.rstrip('/')}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    tokens = post(
        "/tokenize", {"model": model, "messages": messages, "add_generation_prompt": True, "add_special_tokens": False}
    )["tokens"]
    return post("/detokenize", {"model": model, "tokens": tokens})["prompt"]
