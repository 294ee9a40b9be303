import math

import pytest
import torch

from dinotxt.train.optim import build_optimizer, param_groups, warmup_cosine


def test_no_decay_groups(tiny_model):
    groups = param_groups(tiny_model.named_parameters(), 1e-4, verbose=False)
    decay = {id(p) for p in groups[0]["params"]}
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    for n, p in tiny_model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in decay and all(id(p) not in {id(q) for q in g["params"]} for g in groups)
            continue
        no_decay = p.ndim < 2 or n.endswith(".bias") or n == "logit_scale"
        assert (id(p) not in decay) == no_decay, n
    assert any("ls1.gamma" in names[id(p)] for p in groups[1]["params"])
    assert any("norm" in names[id(p)] for p in groups[1]["params"])


def test_warmup_cosine_schedule():
    f = warmup_cosine(10, 110)
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)  # from lr 0 at step 0
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_adamw_settings(tiny_model):
    opt, sched = build_optimizer(tiny_model, 7e-4, 1e-4, [0.9, 0.99], 1e-8, 2000, 50000)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["eps"] == 1e-8
    assert opt.param_groups[0]["lr"] == 0.0  # the official warmup starts at 0
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(7e-4 / 2000)
