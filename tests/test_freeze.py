"""Frozen backbone on real ppdet training: frozen weights and BN statistics bit-for-bit unchanged (raw and
EMA/evaluated copies), no optimizer state for them, every trainable parameter changed; layered unfreezing."""
from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.errors import ConfigError

FAST = {"batch_size": 4, "warmup_steps": 1, "lr": 0.1, "multiscale": False, "visualdl": False, "ema_decay": 0.9}


def _load(path):
    from detect.heavy import paddle_stack

    return {k: v.numpy() for k, v in paddle_stack().paddle.load(str(path)).items()}


@pytest.fixture(scope="module")
def start_weights(tiny_spec, tmp_path_factory):
    """Weights the runs start from: a randomly initialised tiny PP-YOLOE+ with non-trivial BN statistics."""
    from detect.heavy import paddle_stack
    from detect.ppyoloe import RunPaths, activate, build_config

    paddle = paddle_stack().paddle
    out = tmp_path_factory.mktemp("start") / "start.pdparams"
    activate(build_config(tiny_spec, RunPaths(out.parent)))
    from ppdet.core.workspace import create

    paddle.seed(11)
    state = create("YOLOv3").state_dict()
    rng = np.random.default_rng(0)
    for name, tensor in state.items():  # BN running stats away from 0/1, so "unchanged" is not trivially true
        if name.endswith("_mean"):
            tensor.set_value(rng.normal(0, 0.1, tensor.shape).astype("float32"))
        elif name.endswith("_variance"):
            tensor.set_value(rng.uniform(0.5, 1.5, tensor.shape).astype("float32"))
    paddle.save(state, str(out))
    return out


@pytest.mark.timeout(120)
def test_frozen_backbone_stays_bit_for_bit_and_the_rest_trains(tiny_spec, start_weights, tmp_path):
    from detect.checkpoints import find_resumable
    from detect.train import train

    out = start_weights
    start = _load(out)
    spec = tiny_spec.with_cli({"train": {**FAST, "epochs": 2, "freeze": "backbone", "pretrained": str(out)}})
    result = train(spec, tmp_path / "frozen", quiet=True)
    ckpt = find_resumable(result.run.checkpoints)
    raw, ema, best = _load(ckpt.path / "model.pdparams"), _load(ckpt.path / "ema.pdparams"), _load(result.best_weights)
    frozen = [k for k in start if k.startswith("backbone.")]
    assert any(k.endswith("_mean") for k in frozen) and any(k.endswith("_variance") for k in frozen)
    for name in frozen:  # weights and BN buffers, in the raw, EMA and evaluated/exported copies
        for copy_name, copy in (("raw", raw), ("ema", ema), ("best", best)):
            assert np.array_equal(copy[name], start[name]), f"{copy_name} {name} changed"
    # no optimizer state (Momentum velocity) for a frozen parameter, one for every trained one
    from detect.heavy import paddle_stack

    opt = paddle_stack().paddle.load(str(ckpt.path / "optimizer.pdopt"))["accumulators"]
    velocity = {key.split("@", 1)[1]: v.numpy() for key, v in opt.items()}
    assert velocity and not any(n.startswith("backbone.") for n in velocity)
    # every trainable parameter received gradients (has optimizer state) and changed, except where the
    # gradient was zero (the regression branch of a pyramid level without a positive sample) or too small
    # to move a float32 (BN gammas at 1.0 get ~1e-8 steps; float32 spacing at 1.0 is 1.2e-7)
    trainable = [k for k in start if not k.startswith("backbone.") and k != "yolo_head.proj_conv.weight"
                 and not k.endswith(("_mean", "_variance"))]
    assert set(trainable) <= set(velocity)
    for name in trainable:
        if np.array_equal(raw[name], start[name]):
            assert np.abs(velocity[name]).max() < 1e-6, f"{name} had a real gradient but did not change"
    changed = sum(not np.array_equal(raw[k], start[k]) for k in trainable)
    assert changed >= 0.75 * len(trainable), (changed, len(trainable))
    stats = [k for k in start if not k.startswith("backbone.") and k.endswith(("_mean", "_variance"))]
    assert all(not np.array_equal(raw[k], start[k]) for k in stats if "stem_reg.0" not in k and "stem_reg.1" not in k)


@pytest.mark.timeout(120)
def test_unfreeze_at_epoch_thaws_stages_with_their_own_learning_rate(tiny_spec, start_weights, tmp_path):
    from detect.checkpoints import list_checkpoints
    from detect.train import train

    out = start_weights
    start = _load(out)
    spec = tiny_spec.with_cli({"train": {**FAST, "epochs": 2, "freeze": "2", "unfreeze_at_epoch": 2,
                                         "unfreeze_lr_factor": 0.5, "pretrained": str(out)}})
    result = train(spec, tmp_path / "thaw", quiet=True)
    e1, e2 = list_checkpoints(result.run.checkpoints)[-2:]
    first, second = _load(e1.path / "model.pdparams"), _load(e2.path / "model.pdparams")
    stem_stage0 = [k for k in start if k.startswith(("backbone.stem.", "backbone.stages.0.", "backbone.stages.1."))]
    convs = [k for k in stem_stage0 if k.endswith("conv.weight")]
    stage2 = [k for k in start if k.startswith("backbone.stages.2.") and k.endswith("conv.weight")]
    assert all(np.array_equal(first[k], start[k]) for k in stem_stage0)  # frozen during epoch 1 (BN stats too)
    assert all(not np.array_equal(first[k], start[k]) for k in stage2)  # never frozen
    assert all(not np.array_equal(second[k], first[k]) for k in convs)  # trained in epoch 2
    from detect.heavy import paddle_stack

    def optimized(ckpt):
        names = paddle_stack().paddle.load(str(ckpt.path / "optimizer.pdopt"))["accumulators"]
        return {key.split("@", 1)[1] for key in names}

    assert not optimized(e1) & set(convs) and set(convs) <= optimized(e2)
    assert e2.state()["thawed"] is True and e1.state()["thawed"] is False


def test_freeze_specs_and_their_errors():
    from detect.freeze import parse_freeze

    assert parse_freeze("none").prefixes() == []
    assert parse_freeze("stem").prefixes() == ["backbone.stem."]
    assert parse_freeze(2).prefixes() == ["backbone.stem.", "backbone.stages.0.", "backbone.stages.1."]
    assert parse_freeze("backbone").prefixes() == ["backbone."] == parse_freeze("4").prefixes()
    with pytest.raises(ConfigError, match=r"stage 5 does not exist.*4 stages"):
        parse_freeze("5")
    with pytest.raises(ConfigError, match="not a freeze spec.*none, stem, backbone"):
        parse_freeze("neck")


def test_bad_freeze_settings_fail_before_training(tiny_spec, tmp_path):
    from detect.train import train

    with pytest.raises(ConfigError, match="stage 7 does not exist"):
        train(tiny_spec.with_cli({"train": {"freeze": "7"}}), tmp_path / "a")
    with pytest.raises(ConfigError, match="nothing to unfreeze"):
        train(tiny_spec.with_cli({"train": {"unfreeze_at_epoch": 2}}), tmp_path / "b")
    with pytest.raises(ConfigError, match="not an epoch of this run"):
        train(tiny_spec.with_cli({"train": {"freeze": "stem", "unfreeze_at_epoch": 9, "epochs": 3}}), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_thaw_restores_gradients_bn_statistics_ema_and_scales_the_learning_rate(tiny_spec, tmp_path):
    from detect.freeze import apply_freeze, parse_freeze
    from detect.heavy import paddle_stack
    from detect.ppyoloe import RunPaths, activate, build_config

    activate(build_config(tiny_spec.with_cli({"train": {"freeze": "stem"}}), RunPaths(tmp_path)))
    from ppdet.core.workspace import create
    from ppdet.optimizer.ema import ModelEMA

    model = create("YOLOv3")
    ema = ModelEMA(model, decay=0.9, ema_decay_type="exponential", ema_black_list=parse_freeze("stem").prefixes())
    state = apply_freeze(model, parse_freeze("stem"))
    stem = dict(model.backbone.stem.named_parameters())
    assert stem and all(p.stop_gradient for p in stem.values())
    assert set(state.params) == {f"backbone.stem.{n}" for n, p in stem.items() if not n.endswith(("_mean", "_variance"))}
    assert all(bn._use_global_stats for bn in state.bn_layers.values()) and len(state.bn_layers) == 3
    assert all(not p.stop_gradient for n, p in model.backbone.stages.named_parameters() if not n.endswith(("_mean", "_variance")))
    assert ema.state_dict["backbone.stem.conv1.conv.weight"] is model.state_dict()["backbone.stem.conv1.conv.weight"]
    assert state.thaw(0.25, ema) and not state.thaw(0.25, ema)  # once only
    thawed = [p for n, p in stem.items() if not n.endswith(("_mean", "_variance"))]
    assert all(not p.stop_gradient and p.optimize_attr["learning_rate"] == 0.25 for p in thawed)
    assert all(p.stop_gradient for n, p in stem.items() if n.endswith(("_mean", "_variance")))
    assert all(bn._use_global_stats is None for bn in state.bn_layers.values())
    key = "backbone.stem.conv1.conv.weight"
    assert key not in ema.ema_black_list and ema.state_dict[key] is not model.state_dict()[key]
    assert np.array_equal(ema.state_dict[key].numpy(), model.state_dict()[key].numpy())
    assert paddle_stack().paddle  # imported through the safe entry point
