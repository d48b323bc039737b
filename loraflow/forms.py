"""How the config's JSON schema is shaped for Prefect's run forms (the UI's Run → Custom run renders it).

The schema itself is the pydantic models' (loraflow/config.py, the objectives' and adapters' settings); these hooks,
set as a field's `json_schema_extra`, only change how Prefect's forms draw a field, never what a config accepts.
"""

from __future__ import annotations


def choice_or_module_names(schema: dict) -> None:
    """A `choice | list of module names` field's form: its two tabs titled for what they are (Prefect labels untitled
    options by type: "str", "list"), and a single choice as a one-item dropdown (a const shows as "cannot be changed")."""
    for option in schema.get("anyOf", []):
        if option.get("type") == "array":
            option["title"] = "module names"
        else:
            option["title"] = "choice"
            if "const" in option:
                option["enum"] = [option.pop("const")]


def tabs_per_option(schema: dict) -> None:
    """A tagged union's form as one tab per option: an anyOf, not the oneOf (with a discriminator) pydantic writes, which
    Prefect's form renders as raw JSON (and whose check the server applies: a value two options accept is refused)."""
    schema["anyOf"] = schema.pop("oneOf")
    schema.pop("discriminator", None)
