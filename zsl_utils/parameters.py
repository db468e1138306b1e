"""The notebooks' parameters as injected by papermill, checked against the parameters cell's annotations."""
from typing import Any, Mapping, get_args, get_origin

from zsl_utils.errors import ParameterError


def _fits(value: Any, annotation: Any) -> bool:
    kind = get_origin(annotation) or annotation
    if kind is list:
        return isinstance(value, list) and all(_fits(v, get_args(annotation)[0]) for v in value)
    if isinstance(value, bool) or kind is bool:  # bool is an int subclass: never mix them
        return isinstance(value, bool) and kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def check_parameter_types(namespace: Mapping[str, Any]) -> None:
    """Raise :class:`ParameterError` naming each annotated parameter whose value has another type (``papermill -p``)."""
    wrong = [f"{name}={namespace.get(name)!r} (expected {getattr(kind, '__name__', kind)})"
             for name, kind in namespace.get("__annotations__", {}).items() if not _fits(namespace.get(name), kind)]
    if wrong:
        raise ParameterError(f"notebook parameters of the wrong type: {', '.join(wrong)}. Pass numbers unquoted "
                             "(papermill -p num_steps 400) or use python -m zsl_utils run --set NAME=VALUE.")
