"""The field's names for preference tuning in a --config file: axolotl's ``rl:`` and ``rl_beta``,
TRL DPOConfig's ``loss_type`` (``beta`` is LEMA's own option name too)."""

from __future__ import annotations

from typing import Any

from lema.errors import ConfigError

_PREFERENCE = ("dpo", "ipo", "orpo", "simpo", "kto")


def _rl(value: Any, where: str) -> dict[str, Any]:
    """axolotl's ``rl:``: the preference method (``lema train --method``)."""
    if value in _PREFERENCE:
        return {"method": value}
    raise ConfigError(f"{where}: {value!r}: LEMA trains {', '.join(_PREFERENCE)} (lema train --method); "
                      "remove the key for supervised fine-tuning")


def _loss_type(value: Any, where: str) -> dict[str, Any]:
    """TRL DPOConfig's ``loss_type``: sigmoid is DPO, ipo is IPO (``lema train --method``)."""
    methods = {"sigmoid": "dpo", "ipo": "ipo"}
    kind = value[0] if isinstance(value, list) and len(value) == 1 else value
    if kind in methods:
        return {"method": methods[kind]}
    raise ConfigError(f"{where}: {value!r}: LEMA's DPO losses are sigmoid (--method dpo) and ipo (--method ipo); "
                      "ORPO, SimPO and KTO are --method orpo, simpo, kto")



TRL_PREFERENCE = {"loss_type": _loss_type}
AXOLOTL_PREFERENCE = {"rl": _rl, "rl_beta": lambda value, where: {"beta": value}}
