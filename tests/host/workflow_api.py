"""UI-format workflow JSON -> API-format prompt, using the server's /object_info (as the frontend does)."""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec: list[Any]) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def to_api(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """Convert a saved (UI) workflow to the ``/prompt`` format.

    Raises:
        KeyError: a node type the server does not know (a missing node).
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[str, Any] = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        linked = {inp["name"]: inp["link"] for inp in node.get("inputs", []) if inp.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                if name in linked:
                    src = links[linked[name]]
                    inputs[name] = [str(src[1]), src[2]]
                    continue
                if not _is_widget(spec):
                    continue
                if not values:
                    break
                inputs[name] = values.pop(0)
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if opts.get("control_after_generate") and values and values[0] in ("fixed", "increment", "decrement", "randomize"):
                    values.pop(0)  # the UI-only "control after generate" value
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt
