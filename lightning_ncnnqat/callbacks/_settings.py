"""QATCallback's settings: ``config`` (a :class:`QATConfig`) and ``export`` (an
:class:`ExportConfig`), and the keyword arguments of earlier releases that forward to them.

The old arguments (``QATCallback(momentum=..., export_dir=..., targets=...)``) keep working for
one release: each warns with a DeprecationWarning naming its new place, and one given beside
the new object with another value raises ConfigError (the callback would otherwise have to pick
one silently). Validation is the two objects' own (``__post_init__``), never repeated here.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from lightning_ncnnqat.errors import ConfigError, ConfigTypeError, NcnnQatError
from lightning_ncnnqat.export.config import ExportConfig
from lightning_ncnnqat.qat.config import QATConfig

#: QATCallback keyword arguments of earlier releases that are QATConfig fields now (same names).
OLD_QAT_ARGS = (
    "momentum", "six_bit_3x3", "skip", "quantize_grouped_convs", "sync_ranges", "range_init",
    "calibration_batches", "ranges", "range_lr", "freeze_bn_after",
)
#: QATCallback keyword arguments of earlier releases -> their ExportConfig field.
OLD_EXPORT_ARGS = {
    "export_dir": "dir", "held_batch_size": "held_batch_size", "preflight": "preflight",
    "targets": "targets", "preprocessing": "preprocessing", "float_weights": "float_weights",
}


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"QATCallback({old}=...) is deprecated: use {new}", DeprecationWarning, stacklevel=4)


def _conflict(old: str, value: Any, new: str, new_value: Any) -> ConfigError:
    return ConfigError(
        f"QATCallback: `{old}`={value!r} conflicts with `{new}`={new_value!r}: set it once, in `{new.split('.')[0]}`",
        argument=old, value=value,
    )


def qat_config(config: Any, old: dict[str, Any]) -> QATConfig:
    """The QATConfig of ``QATCallback(config=config, **old)``.

    Raises:
        ConfigTypeError: ``config`` is neither a QATConfig, a dict of its fields nor None.
        ConfigError: an old argument beside ``config`` with another value; any bad field value.
    """
    for name in old:
        _deprecated(name, f"config=QATConfig({name}=...)")
    from_old = QATConfig(**{k: (tuple(v) if k == "skip" and isinstance(v, list) else v) for k, v in old.items()})
    if config is None:
        return from_old
    if isinstance(config, Mapping):
        config = QATConfig(**config)
    if not isinstance(config, QATConfig):
        raise ConfigTypeError(
            f"QATCallback: `config` must be a QATConfig, a dict of its fields or None, got {config!r}",
            argument="config", value=config,
        )
    for name in old:
        if getattr(from_old, name) != getattr(config, name):
            raise _conflict(name, old[name], f"config.{name}", getattr(config, name))
    return config


def export_config(export: Any, old: dict[str, Any]) -> ExportConfig | None:
    """The ExportConfig of ``QATCallback(export=export, **old)``; None: no export.

    ``export``: an ExportConfig (or a dict of its fields), True (the defaults), False or None
    (no export). ``old["export_dir"] = None`` meant no export.

    Raises:
        ConfigTypeError: ``export`` of another type.
        ConfigError: an old argument beside ``export`` with another value; any bad field value.
    """
    for name, field in OLD_EXPORT_ARGS.items():
        if name in old:
            off = name == "export_dir" and old[name] is None
            _deprecated(name, "export=None" if off else f"export=ExportConfig({field}=...)")
    settings = {OLD_EXPORT_ARGS[k]: v for k, v in old.items() if not (k == "export_dir" and v is None)}
    try:
        from_old = ExportConfig(**settings)  # checked even where export is off, as before
    except NcnnQatError as e:
        raise _renamed(e) from None
    old_off = "export_dir" in old and old["export_dir"] is None
    if export is True:
        return None if old_off else from_old
    if export is False or export is None:
        if "export_dir" in old and not old_off:
            raise _conflict("export_dir", old["export_dir"], "export", export)
        return None
    if isinstance(export, Mapping):
        export = ExportConfig.coerce(export, "export")
    if not isinstance(export, ExportConfig):
        raise ConfigTypeError(
            f"QATCallback: `export` must be an ExportConfig, a dict of its fields, True, False or None, "
            f"got {export!r} ({type(export).__name__})",
            argument="export", value=export,
        )
    if old_off:
        raise _conflict("export_dir", None, "export", export)
    for name in old:
        field = OLD_EXPORT_ARGS[name]
        if getattr(from_old, field) != getattr(export, field):
            raise _conflict(name, old[name], f"export.{field}", getattr(export, field))
    return export


def _renamed(e: NcnnQatError) -> NcnnQatError:
    """An ExportConfig error about ``dir`` from the old ``export_dir=``: named as given."""
    if e.argument != "dir":
        return e
    message = str(e).replace("`dir` must be a path", "`export_dir` must be a path or None")
    return type(e)(message, argument="export_dir", value=e.value)


def split_old(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``kwargs`` of QATCallback as (old QATConfig arguments, old export arguments).

    Raises:
        ConfigTypeError: a name QATCallback never took (as Python's own unexpected-keyword error).
    """
    unknown = [k for k in kwargs if k not in OLD_QAT_ARGS and k not in OLD_EXPORT_ARGS]
    if unknown:
        raise ConfigTypeError(
            f"QATCallback() got an unexpected keyword argument {unknown[0]!r}", argument=unknown[0],
            value=kwargs[unknown[0]],
        )
    return (
        {k: v for k, v in kwargs.items() if k in OLD_QAT_ARGS},
        {k: v for k, v in kwargs.items() if k in OLD_EXPORT_ARGS},
    )
