"""Frozen backbone for PP-YOLOE+ (``train.freeze``) and layered unfreezing (``train.unfreeze_at_epoch``).

ppdet's CSPResNet has no freeze option and swallows unknown keys, so freezing is done here, on the built
model, in three parts that must all hold (STACK.md, "Freezing"):

* ``stop_gradient = True``: the parameters get no gradient, so the optimizer gives them no state
  (Momentum creates its velocity lazily, for parameters that had a gradient) and no weight decay;
* ``_use_global_stats = True`` on their BatchNorm layers: ppdet calls ``model.train()`` every epoch, so
  ``layer.eval()`` would not last; with global stats the running mean/variance are used and never updated;
* the frozen names are on the EMA black list (see :func:`frozen_prefixes`, used by ``build_config``):
  ppdet's EMA would otherwise blend a zero-initialised copy towards them and the *evaluated and exported*
  weights of a frozen layer would differ from the loaded ones.

Thawing (at ``unfreeze_at_epoch``) undoes the three and scales the thawed parameters' learning rate by
``unfreeze_lr_factor`` through Paddle's per-parameter ``optimize_attr['learning_rate']``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_runtime.errors import ConfigError

if TYPE_CHECKING:
    from detect.settings import TrainSettings

CSPRESNET_STAGES = 4  # PP-YOLOE+ CSPResNet: stem + 4 stages (layers [3, 6, 6, 3]) for every model size


@dataclass(frozen=True)
class FreezePlan:
    """What ``train.freeze`` freezes: the stem and the first ``stages`` CSPResNet stages."""

    spec: str
    stem: bool = False
    stages: int = 0

    @property
    def active(self) -> bool:
        return self.stem or self.stages > 0

    def prefixes(self) -> list[str]:
        """State-dict name prefixes of the frozen layers (parameters and BN buffers)."""
        if not self.active:
            return []
        if self.stages >= CSPRESNET_STAGES:
            return ["backbone."]
        return ["backbone.stem."] + [f"backbone.stages.{i}." for i in range(self.stages)]

    def describe(self) -> str:
        if not self.active:
            return "nothing frozen"
        if self.stages >= CSPRESNET_STAGES:
            return "whole backbone frozen (stem + 4 stages)"
        return "stem frozen" if self.stages == 0 else f"stem + first {self.stages} backbone stage(s) frozen"


def parse_freeze(value: Any, where: str = "train.freeze") -> FreezePlan:
    """``none | stem | backbone | N`` (N = stem + first N of the 4 CSPResNet stages; 0 = none)."""
    text = str(value).strip().lower()
    if text in ("none", "", "false", "0"):
        return FreezePlan("none")
    if text == "stem":
        return FreezePlan("stem", stem=True)
    if text in ("backbone", "all"):
        return FreezePlan("backbone", stem=True, stages=CSPRESNET_STAGES)
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"{where}: '{value}' is not a freeze spec. Use none, stem, backbone or a number of "
                          f"backbone stages 1-{CSPRESNET_STAGES} (e.g. freeze: 2).") from None
    if n < 0 or n > CSPRESNET_STAGES:
        raise ConfigError(f"{where}: stage {n} does not exist: the PP-YOLOE+ backbone (CSPResNet) has "
                          f"{CSPRESNET_STAGES} stages, so use 1-{CSPRESNET_STAGES}, or 'backbone' for all of it.")
    return FreezePlan(str(n), stem=True, stages=n)


def frozen_prefixes(freeze: str) -> list[str]:
    """State-dict prefixes frozen by a ``train.freeze`` value (kept out of ppdet's EMA)."""
    return parse_freeze(freeze).prefixes()


def check_unfreeze(train: "TrainSettings") -> None:
    """``unfreeze_at_epoch`` must name an epoch of this run and needs something frozen."""
    at = train.unfreeze_at_epoch
    if at == 0:
        return
    if not parse_freeze(train.freeze).active:
        raise ConfigError(f"train.unfreeze_at_epoch is {at} but train.freeze is '{train.freeze}': "
                          f"nothing to unfreeze. Set freeze (e.g. backbone) or unfreeze_at_epoch: 0.")
    if at < 0 or at > train.epochs:
        raise ConfigError(f"train.unfreeze_at_epoch {at} is not an epoch of this run (1-{train.epochs}); "
                          f"0 keeps the layers frozen to the end.")
    if train.unfreeze_lr_factor <= 0:
        raise ConfigError("train.unfreeze_lr_factor must be > 0 (the thawed layers' share of the learning rate).")


def _matches(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)


@dataclass
class FreezeState:
    """The frozen layers of one model; :meth:`thaw` undoes :func:`apply_freeze` exactly once."""

    plan: FreezePlan
    params: dict[str, Any] = field(default_factory=dict)  # name -> Parameter that was trainable
    bn_layers: dict[str, Any] = field(default_factory=dict)  # name -> BatchNorm layer
    bn_original: dict[str, Any] = field(default_factory=dict)  # name -> original _use_global_stats
    thawed: bool = False

    def thaw(self, lr_factor: float = 1.0, ema=None) -> list[str]:
        """Make the frozen layers trainable again; their EMA restarts from their current values."""
        if self.thawed or not self.plan.active:
            return []
        from detect.heavy import paddle_stack

        paddle = paddle_stack().paddle
        for param in self.params.values():
            param.stop_gradient = False
            param.optimize_attr["learning_rate"] = float(lr_factor)
        for name, layer in self.bn_layers.items():
            layer._use_global_stats = self.bn_original[name]
        if ema is not None:
            prefixes = self.plan.prefixes()
            for key in list(ema.ema_black_list):
                if _matches(key, prefixes):
                    ema.ema_black_list.discard(key)
                    ema.state_dict[key] = paddle.assign(ema.state_dict[key].detach())
        self.thawed = True
        return list(self.params)


def apply_freeze(model, plan: FreezePlan) -> FreezeState:
    """Freeze ``plan``'s layers of ``model`` (a ppdet PP-YOLOE+ detector); returns what was frozen."""
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    state = FreezeState(plan)
    prefixes = plan.prefixes()
    if not prefixes:
        return state
    for name, param in model.named_parameters():
        # BN running statistics are parameters with stop_gradient already set: leave them, thaw must not flip them
        if _matches(name, prefixes) and not param.stop_gradient:
            param.stop_gradient = True
            state.params[name] = param
    for name, layer in model.named_sublayers():
        if isinstance(layer, paddle.nn.layer.norm._BatchNormBase) and _matches(name + ".", prefixes):
            state.bn_original[name] = layer._use_global_stats
            layer._use_global_stats = True
            state.bn_layers[name] = layer
    if not state.params:
        raise ConfigError(f"train.freeze '{plan.spec}' matched no parameter of the model "
                          f"(prefixes {prefixes}): is this a PP-YOLOE+ (CSPResNet) model?")
    return state
