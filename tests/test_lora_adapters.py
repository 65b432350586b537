"""The adapter math against implementations we did not write: PEFT's merge_and_unload for
LoRA and DoRA, lycoris-lora's own modules for LoCon, LoHa, LoKr, GLoRA, OFT, BOFT and
full diffs, each on tiny Linear and Conv2d layers with random adapter weights."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
lycoris_modules = pytest.importorskip("lycoris.modules")

from ckptkit.lora import adapters  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

ATOL = 1e-5


def close(a, b, atol=ATOL):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= atol * max(1.0, b.abs().max().item()), err


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 12)
        self.conv = torch.nn.Conv2d(8, 12, 3, padding=1)


def randomize(module, std=0.3, skip=()):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not any(s in name for s in skip):
                p.normal_(0, std)


# ---- PEFT: LoRA and DoRA ----

def peft_model(use_dora, alpha=8, seed=0):
    torch.manual_seed(seed)
    base = Tiny()
    config = peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=["lin", "conv"],
                             use_dora=use_dora, init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    randomize(model, 0.2, skip=("base_layer",))
    return model


def peft_parts(model, name):
    layer = getattr(model.base_model.model, name)
    t = {"down": layer.lora_A["default"].weight.detach().clone(),
         "up": layer.lora_B["default"].weight.detach().clone()}
    if layer.use_dora["default"]:
        # PEFT's magnitude is per output channel, (1, out, 1, 1) on a conv: passed as (out,)
        t["dora_scale"] = layer.lora_magnitude_vector["default"].weight.detach().reshape(-1)
    return layer.base_layer.weight.detach().clone(), t


def peft_merged(model, name, strength=1.0):
    if strength != 1.0:
        for layer_name in ("lin", "conv"):
            getattr(model.base_model.model, layer_name).scale_layer(strength)
    return getattr(model.merge_and_unload(), name).weight.detach()


@pytest.mark.parametrize("name", ["lin", "conv"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_lora_equals_peft_merge(name, strength):
    model = peft_model(use_dora=False)
    w, t = peft_parts(model, name)
    ours = adapters.patch("lora", w, t, alpha=8.0, strength=strength)
    close(ours, peft_merged(model, name, strength))


@pytest.mark.parametrize("name", ["lin", "conv"])
def test_dora_equals_peft_merge_at_strength_1(name):
    model = peft_model(use_dora=True)
    w, t = peft_parts(model, name)
    close(adapters.patch("lora", w, t, alpha=8.0, strength=1.0), peft_merged(model, name))


@pytest.mark.parametrize("name", ["lin", "conv"])
def test_dora_at_other_strengths_is_the_straight_line_comfyui_takes(name):
    """Our choice (ComfyUI, Forge, A1111): W + s (DoRA(W) - W); PEFT's own scaling differs."""
    strength = 0.4
    model = peft_model(use_dora=True)
    w, t = peft_parts(model, name)
    at_one = peft_merged(peft_model(use_dora=True), name)
    ours = adapters.patch("lora", w, t, alpha=8.0, strength=strength)
    close(ours, w + strength * (at_one - w))
    close(adapters.patch("lora", w, t, alpha=8.0, strength=0.0), w)
    peft_own = peft_merged(model, name, strength)
    assert (ours - peft_own).abs().max() > 1e-3  # the tools do disagree here


def test_peft_bias_is_scaled_like_the_weight():
    torch.manual_seed(1)
    base = Tiny()
    config = peft.LoraConfig(r=4, lora_alpha=2, target_modules=["lin"], lora_bias=True,
                             init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    randomize(model, 0.2, skip=("base_layer",))
    layer = model.base_model.model.lin
    bias = layer.lora_B["default"].bias.detach().clone()
    b = layer.base_layer.bias.detach().clone()
    close(adapters.patch_bias(b, bias, 1.0, scale=adapters.scale(2.0, 4)),
          model.merge_and_unload().lin.bias)


# ---- lycoris-lora ----

LYCORIS_ROLES = {
    "lora_up.weight": "up", "lora_down.weight": "down", "lora_mid.weight": "mid",
    "dora_scale": "dora_scale", "oft_blocks": "blocks", "rescale": "rescale",
    "a1.weight": "a1", "a2.weight": "a2", "b1.weight": "b1", "b2.weight": "b2",
    "weight": "weight", "on_input": "on_input", "diff": "diff", "diff_b": "diff_b",
}


def lycoris_parts(module):
    t, alpha = {}, None
    for key, value in module.state_dict().items():
        value = value.detach().clone().float()
        if key == "alpha":
            alpha = float(value)
        elif key.startswith(("hada_", "lokr_")):
            t[key.split("_", 1)[1].replace("_", "")] = value  # hada_w1_a: w1a
        else:
            t[LYCORIS_ROLES[key]] = value
    return t, alpha


def linear(out=12, inp=16):
    torch.manual_seed(3)
    return torch.nn.Linear(inp, out)


def conv(out=12, inp=8, k=3):
    torch.manual_seed(4)
    return torch.nn.Conv2d(inp, out, k, padding=k // 2)


def build(cls, org, std=0.3, seed=5, **kwargs):
    module = cls("x", org, multiplier=1.0, **kwargs)
    torch.manual_seed(seed)
    randomize(module, std)
    return module


LOCON_CASES = {
    "linear": (linear, {}),
    "conv 1x1": (lambda: conv(k=1), {}),
    "conv 3x3": (conv, {}),
    "conv 3x3 tucker": (conv, {"use_tucker": True}),
    "dora on output rows": (linear, {"weight_decompose": True}),
    "dora on input columns": (linear, {"weight_decompose": True, "wd_on_out": False}),
    "conv dora on input columns": (conv, {"weight_decompose": True, "wd_on_out": False}),
}


@pytest.mark.parametrize("case", LOCON_CASES)
def test_locon_equals_lycoris(case):
    make, kwargs = LOCON_CASES[case]
    org = make()
    module = build(lycoris_modules.LoConModule, org, lora_dim=4, alpha=3, **kwargs)
    t, alpha = lycoris_parts(module)
    w = org.weight.detach().clone()
    close(adapters.patch("lora", w, t, alpha, 1.0), module.get_merged_weight(1.0)[0].detach())
    if "dora_scale" not in t:  # LyCORIS's DoRA strength is its own (see the module docstring)
        close(adapters.patch("lora", w, t, alpha, 0.7),
              module.get_merged_weight(0.7)[0].detach())


def lycoris_forward(module, org, x, strength):
    """The layer's output as LyCORIS computes it in training (weight rebuilt, not bypassed)."""
    module.multiplier = strength
    module.bypass_mode = False
    module.apply_to()
    try:
        return org(x).detach()
    finally:
        module.restore()


def our_forward(org, weight, x):
    if isinstance(org, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight, org.bias)
    return torch.nn.functional.conv2d(x, weight, org.bias, padding=org.padding)


def input_for(org):
    torch.manual_seed(9)
    if isinstance(org, torch.nn.Linear):
        return torch.randn(5, org.in_features)
    return torch.randn(2, org.in_channels, 6, 6)


LOHA_CASES = {
    "linear": (linear, {}),
    "conv 3x3": (conv, {}),
    "conv 3x3 tucker": (conv, {"use_tucker": True}),
    "dora": (linear, {"weight_decompose": True}),
}


def strengths(cases: dict) -> list[tuple[str, float]]:
    """Each case at strengths 1 and 0.5, but DoRA cases at 1 only: LyCORIS's DoRA strength is
    its own (lora.md), not the one ckptkit follows."""
    return [(case, strength) for case in cases for strength in (1.0, 0.5)
            if strength == 1.0 or "weight_decompose" not in cases[case][1]]


@pytest.mark.parametrize("case, strength", strengths(LOHA_CASES))
def test_loha_equals_lycoris(case, strength):
    """Against LyCORIS's forward (the trained behaviour). Its get_diff_weight applies
    alpha/rank twice in lycoris-lora 4.1.3, so at alpha = rank it is compared as well."""
    make, kwargs = LOHA_CASES[case]
    org = make()
    module = build(lycoris_modules.LohaModule, org, std=0.2, lora_dim=4, alpha=2, **kwargs)
    t, alpha = lycoris_parts(module)
    x = input_for(org)
    ours = adapters.patch("loha", org.weight.detach().clone(), t, alpha, strength)
    close(our_forward(org, ours, x), lycoris_forward(module, org, x, strength), 1e-4)
    module = build(lycoris_modules.LohaModule, org, std=0.2, lora_dim=4, alpha=4, **kwargs)
    t, alpha = lycoris_parts(module)
    close(adapters.patch("loha", org.weight.detach().clone(), t, alpha, strength),
          module.get_merged_weight(strength, shape=org.weight.shape)[0].detach())


LOKR_CASES = {
    "w1 full, w2 factored": (lambda: linear(64, 48), {"factor": 8}),
    "both factored": (lambda: linear(64, 48), {"factor": 8, "decompose_both": True}),
    "both full": (lambda: linear(12, 16), {"factor": 4}),
    "conv w2 factored": (lambda: conv(64, 32), {"factor": 8}),
    "conv tucker": (lambda: conv(64, 32), {"factor": 8, "use_tucker": True}),
    "conv both full": (lambda: conv(16, 8), {"factor": 4}),
    "dora": (lambda: linear(64, 48), {"factor": 8, "weight_decompose": True}),
}


@pytest.mark.parametrize("case, strength", strengths(LOKR_CASES))
def test_lokr_equals_lycoris(case, strength):
    make, kwargs = LOKR_CASES[case]
    org = make()
    module = build(lycoris_modules.LokrModule, org, std=0.2, lora_dim=2, alpha=3, **kwargs)
    t, alpha = lycoris_parts(module)
    x = input_for(org)
    ours = adapters.patch("lokr", org.weight.detach().clone(), t, alpha, strength)
    close(our_forward(org, ours, x), lycoris_forward(module, org, x, strength), 1e-4)


@pytest.mark.parametrize("make", [linear, conv], ids=["linear", "conv"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_glora_equals_lycoris(make, strength):
    org = make()
    module = build(lycoris_modules.GLoRAModule, org, std=0.2, lora_dim=4, alpha=2)
    t, alpha = lycoris_parts(module)
    close(adapters.patch("glora", org.weight.detach().clone(), t, alpha, strength),
          module.get_merged_weight(strength)[0].detach())


def test_glora_old_layout_is_read_like_the_new():
    """The older LyCORIS layout, W a2 a1 + b2 b1 with a1 (r, in), a2 (in, r), b1 (r, in),
    b2 (out, r), holding the same factors gives the same weight."""
    org = linear()
    module = build(lycoris_modules.GLoRAModule, org, std=0.2, lora_dim=4, alpha=2)
    t, alpha = lycoris_parts(module)
    old = {"a1": t["a2"], "a2": t["a1"], "b1": t["b2"], "b2": t["b1"]}
    close(adapters.patch("glora", org.weight.detach().clone(), old, alpha, 1.0),
          module.get_merged_weight(1.0)[0].detach())


OFT_CASES = {
    "linear": (linear, {"lora_dim": 4}),
    "linear rescaled": (linear, {"lora_dim": 4, "rescaled": True}),
    "conv": (conv, {"lora_dim": 4}),
    "constraint active": (linear, {"lora_dim": 4, "constraint": 1e-3}),
    "constraint inactive": (linear, {"lora_dim": 4, "constraint": 10.0}),
}


@pytest.mark.parametrize("case", OFT_CASES)
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_diag_oft_equals_lycoris(case, strength):
    make, kwargs = OFT_CASES[case]
    org = make()
    module = build(lycoris_modules.DiagOFTModule, org, std=0.1, **kwargs)
    t, alpha = lycoris_parts(module)
    if "constraint" in kwargs:
        limit = kwargs["constraint"] * org.weight.shape[0]
        q = t["blocks"] - t["blocks"].transpose(1, 2)
        assert (q.norm() > limit) == (case == "constraint active")
    close(adapters.patch("oft", org.weight.detach().clone(), t, alpha, strength),
          module.get_merged_weight(strength)[0].detach())


BOFT_CASES = {
    "linear": (lambda: linear(16, 16), {"lora_dim": 2}),
    "linear rescaled, blocks of 4": (lambda: linear(16, 16), {"lora_dim": 4, "rescaled": True}),
    "conv": (lambda: conv(16, 8), {"lora_dim": 2}),
    "constraint active": (lambda: linear(16, 16), {"lora_dim": 2, "constraint": 1e-3}),
}


@pytest.mark.parametrize("case", BOFT_CASES)
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_boft_equals_lycoris(case, strength):
    make, kwargs = BOFT_CASES[case]
    org = make()
    module = build(lycoris_modules.ButterflyOFTModule, org, std=0.1, **kwargs)
    t, alpha = lycoris_parts(module)
    assert t["blocks"].shape[0] > 1  # more than one butterfly stage
    close(adapters.patch("boft", org.weight.detach().clone(), t, alpha, strength),
          module.get_merged_weight(strength)[0].detach())


@pytest.mark.parametrize("make", [linear, conv], ids=["linear", "conv"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_full_equals_lycoris(make, strength):
    org = make()
    module = build(lycoris_modules.FullModule, org)
    # before apply_to the module's parameters are the diffs (its state_dict assumes after)
    t = {"diff": module.weight.detach().clone(), "diff_b": module.bias.detach().clone()}
    weight, bias = module.get_merged_weight(strength)
    close(adapters.patch("diff", org.weight.detach().clone(), t, None, strength),
          weight.detach())
    close(adapters.patch_bias(org.bias.detach().clone(), t["diff_b"], strength), bias.detach())


# ---- rows: a fused module applied to part of its output at a time ----

@pytest.mark.parametrize("adapter, cls, kwargs", [
    ("lora", lycoris_modules.LoConModule, {"lora_dim": 4, "alpha": 2}),
    ("lora", lycoris_modules.LoConModule, {"lora_dim": 4, "alpha": 2, "weight_decompose": True}),
    ("loha", lycoris_modules.LohaModule, {"lora_dim": 4, "alpha": 4}),
    ("lokr", lycoris_modules.LokrModule, {"lora_dim": 2, "alpha": 1, "factor": 4}),
    ("glora", lycoris_modules.GLoRAModule, {"lora_dim": 4, "alpha": 2}),
    ("oft", lycoris_modules.DiagOFTModule, {"lora_dim": 4, "constraint": 1e-3}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_rows_of_a_module_patch_like_the_whole(adapter, cls, kwargs):
    org = linear(12, 16)
    module = build(cls, org, std=0.2, **kwargs)
    t, alpha = lycoris_parts(module)
    w = org.weight.detach().clone()
    whole = adapters.patch(adapter, w, t, alpha, 0.8)
    for rows in (slice(0, 6), slice(6, 12), slice(3, 6)):
        part = adapters.patch(adapter, w[rows], t, alpha, 0.8, rows=rows, out=12)
        close(part, whole[rows])


def test_what_cannot_be_split_says_so():
    assert adapters.split_problem("boft", {"blocks": (2, 4, 4, 4)}, (0, 8))
    on_columns = {"up": (12, 4), "down": (4, 16), "dora_scale": (1, 16)}
    assert adapters.split_problem("dora", on_columns, (0, 6))
    on_rows = {"up": (12, 4), "down": (4, 16), "dora_scale": (12,)}
    assert adapters.split_problem("dora", on_rows, (0, 6)) is None
    assert adapters.split_problem("oft", {"blocks": (4, 3, 3)}, (3, 9)) is None
    assert adapters.split_problem("oft", {"blocks": (4, 3, 3)}, (4, 9))
    blocks = torch.zeros(4, 3, 3)
    with pytest.raises(adapters.AdapterError):
        adapters.patch("oft", torch.zeros(4, 16), {"blocks": blocks}, None, 1.0,
                       rows=slice(1, 5), out=12)


def test_missing_or_zero_alpha_means_rank():
    up, down = torch.randn(6, 2), torch.randn(2, 5)
    w = torch.zeros(6, 5)
    for alpha in (None, 0.0, 2.0):
        close(adapters.patch("lora", w, {"up": up, "down": down}, alpha, 1.0), up @ down)
    close(adapters.patch("lora", w, {"up": up, "down": down}, 1.0, 1.0), up @ down / 2)


def test_a_change_that_does_not_fit_the_weight_is_an_adapter_error():
    with pytest.raises(adapters.AdapterError):
        adapters.patch("lora", torch.zeros(6, 5), {"up": torch.ones(6, 2),
                                                   "down": torch.ones(2, 4)}, None, 1.0)


def test_set_replaces_the_weight_unless_the_strength_is_0():
    w, new = torch.zeros(4, 3), torch.ones(4, 3)
    close(adapters.patch("set", w, {"set": new}, None, 0.5), new)
    close(adapters.patch("set", w, {"set": new}, None, 0.0), w)
    close(adapters.patch("set", w[2:], {"set": new}, None, 1.0, rows=slice(2, 4), out=4),
          new[2:])
