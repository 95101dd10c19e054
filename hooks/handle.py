"""The `Intervention` handle that `intervene.apply` returns."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from torch import nn

from ..interventions import Method, ModelSpec, method_class
from .dispatch import Dispatcher

SCHEMA = 1


class Intervention:
    """An intervention active on a model: a context manager, undone by `remove()` or on exit.

    `enabled` toggles it without detaching (the eval runner's before/after on one loaded model);
    `config` is the resolved config, which `save()` writes and `intervene.load_config` reads back;
    `state` is what the method kept of the latest sequence (its `State`).
    """

    def __init__(self, dispatcher: Dispatcher, config: Method):
        self.config = config
        self.model_spec: ModelSpec = dispatcher.spec
        self.active_layers = config.active_layers()
        self.enabled = True
        self.state = config.State()
        self._dispatcher = dispatcher
        dispatcher.add(self)  # refused before anything is attached

    @property
    def method(self) -> str:
        return self.config.name

    @property
    def active(self) -> bool:
        return self._dispatcher is not None

    def remove(self) -> None:
        """Detach; once the last intervention on a model is removed, it is exactly as before. Idempotent."""
        if self._dispatcher is not None:
            self._dispatcher.discard(self)
            self._dispatcher = None
            self.new_sequence()

    def new_sequence(self) -> None:
        """Forget what the method kept of the previous sequence."""
        self.state = self.config.State()

    def __enter__(self) -> Intervention:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def to_dict(self) -> dict[str, Any]:
        return config_document(self.config, self.model_spec)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def __repr__(self) -> str:
        status = ("enabled" if self.enabled else "disabled") if self.active else "removed"
        return f"<Intervention {self.config!r} ({status})>"


def config_document(config: Method, spec: ModelSpec) -> dict[str, Any]:
    """What a saved config holds: the resolved method and parameters, and the model they were resolved for."""
    from .. import __version__

    return {
        "schema": SCHEMA,
        "method": config.name,
        "params": config.to_dict(),
        "model": _shape(spec),
        "intervene_version": __version__,
    }


def _shape(spec: ModelSpec) -> dict[str, Any]:
    """The model a config is for, as far as its layers and heads go (a hybrid's attention layers too)."""
    shape = {"name_or_path": spec.name_or_path, "num_layers": spec.num_layers, "num_heads": spec.num_heads}
    return {**shape, "attention_layers": list(spec.attention_layers)} if spec.hybrid else shape


def apply(model: nn.Module, method: str | Method, /, *, config=None, **params) -> Intervention:
    """Apply `method` (a registry name or a config object) to `model` and return its handle.

    `config` is a mapping of parameters or a path to a saved config; keyword `params` override it.
    """
    dispatcher = Dispatcher.of(model)  # probes a model nothing is attached to yet, and refuses what it cannot edit
    spec = dispatcher.spec
    if isinstance(method, Method):
        _check_model(method, spec)
        if config is not None or params:
            method = type(method).from_dict({**method.to_dict(), **_params(config, method.name, spec), **params})
    elif isinstance(method, str):
        method = method_class(method).from_dict({**_params(config, method, spec), **params})
    else:
        raise TypeError(f"method must be a registered name or a config object, got {type(method).__name__}")
    return Intervention(dispatcher, method.resolve(spec))


def load_config(path: str | os.PathLike) -> Method:
    """Read a config written by `Intervention.save` (replay it with `intervene.apply(model, config)`)."""
    with open(path) as f:
        saved = json.load(f)
    if not isinstance(saved, Mapping) or "method" not in saved or "params" not in saved:
        raise ValueError(f"{path}: not an intervene config (expected the keys 'method' and 'params')")
    if saved.get("schema", SCHEMA) > SCHEMA:
        raise ValueError(f"{path}: config schema {saved['schema']} is newer than this intervene ({SCHEMA}); upgrade")
    return replace(method_class(saved["method"]).from_dict(saved["params"]), saved_for=saved.get("model"))


def _check_model(method: Method, spec: ModelSpec) -> None:
    saved, shape = method.saved_for, _shape(spec)
    keys = ("num_layers", "num_heads", "attention_layers")
    if not saved or all(saved.get(key) == shape.get(key) for key in keys):
        return
    raise ValueError(
        f"this {method.name} config was saved for {saved.get('name_or_path') or 'another model'} "
        f"({_geometry(saved)}), not for {spec.name_or_path or 'this model'} ({_geometry(shape)}); "
        "calibrate one for this model with `intervene calibrate`"
    )


def _geometry(shape: Mapping) -> str:
    attention = f", attention layers {shape['attention_layers']}" if shape.get("attention_layers") else ""
    return f"{shape.get('num_layers')} layers x {shape.get('num_heads')} heads{attention}"


def _params(config, method: str, spec: ModelSpec) -> dict:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    saved = load_config(config)
    _check_model(saved, spec)
    if saved.name != method:
        raise ValueError(f"{config}: this config is for method {saved.name!r}, not {method!r}")
    return saved.to_dict()
