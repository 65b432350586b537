"""Merge methods against slow references written here with torch on whole state dicts, on
tiny samples of several families; plus refusals, integer and marker tensors, inpainting
channels, component scope, missing keys and the recipe in the metadata."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptkit.cli.main import main
from ckptkit.errors import OutputError, UsageError
from ckptkit.ops.merge import merge
from ckptkit.ops.sample import sample


@pytest.fixture(scope="module")
def models(module_tmp):
    folder = module_tmp("merge")
    paths = {}
    for fid in ("sd1", "flux1-schnell"):
        for seed in range(4):
            path = folder / f"{fid}_{seed}.safetensors"
            sample(fid, str(path), tiny=True, dtype="fp32", seed=seed)
            paths[(fid, seed)] = str(path)
    return paths


def _weights(path):
    return load_file(path)


def _ref_slerp(a, b, t):
    na, nb = a.norm(), b.norm()
    ua, ub = a / na, b / nb
    if abs(float((ua * ub).sum())) > 1 - 1e-7:  # (anti)parallel, e.g. scalars: no sphere
        return (1 - t) * a + t * b
    omega = torch.arccos((ua * ub).sum().clamp(-1, 1))
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) * ua + math.sin(t * omega) * ub) / s * ((1 - t) * na + t * nb)


def _ref_ties(base, others, alpha, density):
    deltas = []
    for m in others:
        d = (m - base).flatten()
        k = round(density * d.numel())
        keep = torch.zeros_like(d, dtype=torch.bool)
        keep[d.abs().argsort(descending=True)[:k]] = True
        deltas.append(torch.where(keep, d, torch.zeros_like(d)))
    stacked = torch.stack(deltas)
    elected = torch.sign(stacked.sum(0))
    result = torch.zeros_like(base.flatten())
    for i in range(result.numel()):
        agree = [v for v in stacked[:, i].tolist() if v != 0 and math.copysign(1, v) == elected[i]]
        result[i] = sum(agree) / len(agree) if agree else 0.0
    return base + alpha * result.reshape(base.shape)


def _ref_model_stock(base, others):
    deltas = [(m - base).flatten() for m in others]
    cos = [float(torch.nn.functional.cosine_similarity(deltas[i], deltas[j], dim=0))
           for i in range(len(deltas)) for j in range(i + 1, len(deltas))]
    c, n = sum(cos) / len(cos), len(others)
    t = n * c / (1 + (n - 1) * c)
    return t * sum(others) / n + (1 - t) * base


def _ref_train_difference(a, b, c, alpha):
    """supermerger's trainDifference, element by element as its code reads."""
    diff, moved, apart = b - c, (b - a).abs(), (b - c).abs()
    scale = torch.where(moved + apart != 0, moved / (moved + apart), torch.zeros_like(a))
    return a + torch.sign(diff) * scale * diff.abs() * (alpha * 1.8)


CASES = {
    "weighted-sum": (2, {"alpha": 0.3}, lambda m, p: (1 - p["alpha"]) * m[0] + p["alpha"] * m[1]),
    "add-difference": (3, {"alpha": 0.7}, lambda m, p: m[0] + p["alpha"] * (m[1] - m[2])),
    "triple-sum": (3, {"alpha": 0.2, "beta": 0.3},
                   lambda m, p: 0.5 * m[0] + 0.2 * m[1] + 0.3 * m[2]),
    "sum-twice": (3, {"alpha": 0.4, "beta": 0.25},
                  lambda m, p: 0.75 * (0.6 * m[0] + 0.4 * m[1]) + 0.25 * m[2]),
    "n-average": (4, {}, lambda m, p: (m[0] + m[1] + m[2] + m[3]) / 4),
    "slerp": (2, {"alpha": 0.35}, lambda m, p: _ref_slerp(m[0], m[1], p["alpha"])),
    "add-perpendicular": (3, {"alpha": 0.8}, lambda m, p: m[0] + p["alpha"] * (
        (m[1] - m[2]) - (m[0] - m[2]) * ((m[0] - m[2]) * (m[1] - m[2])).sum()
        / ((m[0] - m[2]) ** 2).sum())),
    "model-stock": (4, {}, lambda m, p: _ref_model_stock(m[0], m[1:])),
    "train-difference": (3, {"alpha": 0.6}, lambda m, p: _ref_train_difference(*m, p["alpha"])),
}


@pytest.mark.parametrize("fid", ["sd1", "flux1-schnell"])
@pytest.mark.parametrize("method", list(CASES))
def test_method_matches_slow_reference(models, tmp_path, fid, method):
    count, params, reference = CASES[method]
    paths = [models[(fid, i)] for i in range(count)]
    out = tmp_path / "out.safetensors"
    merge(method, paths, str(out), params=params)
    got = _weights(str(out))
    inputs = [_weights(p) for p in paths]
    checked = 0
    for key, tensor in got.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            assert torch.equal(tensor, inputs[0][key]), key
            continue
        want = reference([m[key].double() for m in inputs], params).float()
        assert torch.allclose(tensor, want, rtol=1e-4, atol=1e-5), (method, key)
        checked += 1
    assert checked > 50


def test_ties_matches_slow_reference(models, tmp_path):
    paths = [models[("sd1", i)] for i in range(4)]
    out = tmp_path / "ties.safetensors"
    merge("ties", paths, str(out), params={"alpha": 0.9, "density": 0.3})
    got, inputs = _weights(str(out)), [_weights(p) for p in paths]
    for key in [k for k in got if got[k].is_floating_point() and 2 < got[k].numel() < 3000][:25]:
        want = _ref_ties(inputs[0][key].double(), [m[key].double() for m in inputs[1:]], 0.9,
                         0.3)
        assert torch.allclose(got[key], want.float(), atol=1e-6), key


def test_dare_is_seeded_and_unbiased_in_expectation(models, tmp_path):
    paths = [models[("sd1", 0)], models[("sd1", 1)]]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    merge("dare", paths, str(a), params={"drop": 0.5, "seed": 3})
    merge("dare", paths, str(b), params={"drop": 0.5, "seed": 3})
    assert a.read_bytes() == b.read_bytes()  # same seed, same file
    got, base, other = _weights(str(a)), _weights(paths[0]), _weights(paths[1])
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    delta, merged = other[key] - base[key], got[key] - base[key]
    kept = merged != 0
    assert 0.45 < kept.float().mean() < 0.55  # about half of the entries dropped
    assert torch.allclose(merged[kept], 2 * delta[kept], atol=1e-6)  # the rest rescaled 1/(1-p)


def test_integers_and_markers_are_copied_not_interpolated(models, tmp_path):
    a = _weights(models[("sd1", 0)])
    a["v_pred"] = torch.tensor([])
    src = tmp_path / "a.safetensors"
    save_file(a, str(src))
    out = tmp_path / "out.safetensors"
    merge("weighted-sum", [str(src), models[("sd1", 1)]], str(out), params={"alpha": 0.5})
    got = _weights(str(out))
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert got[key].dtype == torch.int64 and torch.equal(got[key], a[key])
    assert "v_pred" in got


def test_inpainting_input_channels(models, tmp_path):
    inpaint = tmp_path / "inpaint.safetensors"
    sample("sd1", str(inpaint), tiny=True, dtype="fp32", variant="inpaint", seed=9)
    out = tmp_path / "out.safetensors"
    merge("weighted-sum", [str(inpaint), models[("sd1", 1)]], str(out), params={"alpha": 0.5})
    key = "model.diffusion_model.input_blocks.0.0.weight"
    got, a, b = _weights(str(out))[key], _weights(str(inpaint))[key], _weights(
        models[("sd1", 1)])[key]
    assert got.shape[1] == 9
    assert torch.allclose(got[:, :4], (a[:, :4] + b) / 2)
    assert torch.equal(got[:, 4:], a[:, 4:])


def test_refusals_happen_before_reading(models, tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(UsageError, match="different models"):
        merge("weighted-sum", [models[("sd1", 0)], models[("flux1-schnell", 0)]], str(out),
              params={})
    xl = tmp_path / "xl.safetensors"
    sample("sdxl", str(xl), sparse=True)  # 6.9 GB of holes: refused from the header alone
    with pytest.raises(UsageError, match="different models"):
        merge("weighted-sum", [models[("sd1", 0)], str(xl)], str(out), params={})
    with pytest.raises(UsageError, match="takes 3 models"):
        merge("add-difference", [models[("sd1", 0)], models[("sd1", 1)]], str(out), params={})
    with pytest.raises(UsageError, match="takes no --beta"):
        merge("weighted-sum", [models[("sd1", 0)], models[("sd1", 1)]], str(out),
              params={"beta": 0.1})
    with pytest.raises(OutputError):
        merge("weighted-sum", [models[("sd1", 0)], models[("sd1", 1)]], models[("sd1", 0)],
              params={})
    assert not out.exists()


def test_shape_mismatch_and_missing_keys(models, tmp_path):
    b = _weights(models[("sd1", 1)])
    key = "model.diffusion_model.out.2.weight"
    b[key] = torch.zeros(4, 32, 1, 1)
    odd = tmp_path / "odd.safetensors"
    save_file(b, str(odd))
    with pytest.raises(UsageError, match="cannot be merged"):
        merge("weighted-sum", [models[("sd1", 0)], str(odd)], str(tmp_path / "o.safetensors"),
              params={})
    b = _weights(models[("sd1", 1)])
    del b["model.diffusion_model.out.2.bias"]
    short = tmp_path / "short.safetensors"
    save_file(b, str(short))
    out = tmp_path / "taken.safetensors"
    merge("weighted-sum", [models[("sd1", 0)], str(short)], str(out), params={})
    assert torch.equal(_weights(str(out))["model.diffusion_model.out.2.bias"],
                       _weights(models[("sd1", 0)])["model.diffusion_model.out.2.bias"])
    merge("weighted-sum", [models[("sd1", 0)], str(short)], str(tmp_path / "s.safetensors"),
          params={}, missing="skip")
    assert "model.diffusion_model.out.2.bias" not in _weights(str(tmp_path / "s.safetensors"))
    with pytest.raises(UsageError, match=r"has no model\.diffusion_model\.out\.2\.bias"):
        merge("weighted-sum", [models[("sd1", 0)], str(short)], str(tmp_path / "e.safetensors"),
              params={}, missing="error")


def test_components_scope_dtype_and_recipe(models, tmp_path, capsys, file_sha256):
    a, b = models[("sd1", 0)], models[("sd1", 1)]
    out = tmp_path / "unet_only.safetensors"
    assert main(["merge", "weighted-sum", a, b, "-o", str(out), "--alpha", "0.25",
                 "--components", "diffusion_model", "--dtype", "fp16", "--quiet"]) == 0
    got, wa, wb = _weights(str(out)), _weights(a), _weights(b)
    vae_key = "first_stage_model.decoder.conv_in.weight"
    unet_key = "model.diffusion_model.out.2.weight"
    assert torch.equal(got[vae_key], wa[vae_key].half())
    assert torch.equal(got[unet_key], (0.75 * wa[unet_key] + 0.25 * wb[unet_key]).half())
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["ckptkit.merge_recipe"])
    assert recipe["steps"] == [{"name": "merge", "method": "weighted-sum",
                                "models": ["A", "B"], "params": {"alpha": 0.25}}]
    assert recipe["components"] == ["diffusion_model"] and recipe["dtype"] == "fp16"
    assert recipe["inputs"] == {"A": {"file": "sd1_0.safetensors", "sha256": file_sha256(a)},
                                "B": {"file": "sd1_1.safetensors", "sha256": file_sha256(b)}}
    again = tmp_path / "again.safetensors"
    merge("add-difference", [str(out), a, b], str(again), params={})
    with safe_open(str(again), "pt") as f:
        lineage = json.loads(f.metadata()["ckptkit.merge_lineage"])
    assert "unet_only.safetensors" in lineage  # merges of merges keep their history


@pytest.mark.parametrize(("variant", "channels"), [("inpaint", 9), ("pix2pix", 8)])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_extra_input_channels_in_any_precision(tmp_path, variant, channels, dtype):
    """16-bit models take the fast path of the weighted sum unless shapes differ."""
    wide, plain = tmp_path / "wide.safetensors", tmp_path / "plain.safetensors"
    sample("sd1", str(wide), tiny=True, dtype=dtype, variant=variant, seed=9)
    sample("sd1", str(plain), tiny=True, dtype=dtype, seed=1)
    out = tmp_path / "out.safetensors"
    merge("weighted-sum", [str(plain), str(wide)], str(out), params={"alpha": 0.25})
    key = "model.diffusion_model.input_blocks.0.0.weight"
    got, a, b = (_weights(str(p))[key] for p in (out, plain, wide))
    assert got.shape[1] == channels and got.dtype == a.dtype
    want = 0.75 * a.double() + 0.25 * b[:, :4].double()
    ulp = 2.0 ** -10 if dtype == "fp16" else 2.0 ** -23  # roundings, relative to the inputs
    bound = ulp * (a.double().abs() + b[:, :4].double().abs())
    assert ((got[:, :4].double() - want).abs() <= bound).all()
    assert torch.equal(got[:, 4:], b[:, 4:])  # the extra channels from the model that has them


def test_markers_and_float_position_ids_come_from_a(models, tmp_path):
    """Markers present in both models and position ids stored as floats are A's, unmixed."""
    a, b = _weights(models[("sd1", 0)]), _weights(models[("sd1", 1)])
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    a[key], b[key] = a[key].float(), a[key].float() + 0.4
    a["edm_vpred.sigma_max"], b["edm_vpred.sigma_max"] = torch.tensor(120.0), torch.tensor(80.0)
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for state, path in zip((a, b), paths, strict=True):
        save_file(state, str(path))
    out = tmp_path / "out.safetensors"
    report = merge("weighted-sum", [str(p) for p in paths], str(out), params={"alpha": 0.5})
    got = _weights(str(out))
    assert torch.equal(got[key], a[key])
    assert float(got["edm_vpred.sigma_max"]) == 120.0
    assert report.copied == 2


def test_metadata_describes_the_merge_not_model_a(models, tmp_path):
    a = _weights(models[("sd1", 0)])
    src = tmp_path / "a.safetensors"
    a1111 = json.dumps({"type": "webui", "primary_model_hash": "abc", "method": "Weighted sum"})
    save_file(a, str(src), metadata={
        "modelspec.architecture": "stable-diffusion-v1", "modelspec.prediction_type": "v",
        "modelspec.title": "Model A", "ss_learning_rate": "1e-5", "sd_merge_recipe": a1111,
        "sd_merge_models": "{}"})
    out = tmp_path / "out.safetensors"
    merge("weighted-sum", [str(src), models[("sd1", 1)]], str(out), params={})
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.prediction_type"] == "v"
    for key in ("modelspec.title", "ss_learning_rate", "sd_merge_recipe", "sd_merge_models"):
        assert key not in meta, key
    lineage = json.loads(meta["ckptkit.merge_lineage"])
    assert lineage == {"a.safetensors": {"sd_merge_recipe": a1111, "sd_merge_models": "{}"}}


def test_float64_computation_is_the_slow_way_in_double(models, tmp_path):
    from ckptkit import __version__

    paths = [models[("sd1", 0)], models[("sd1", 1)]]
    out = tmp_path / "out.safetensors"
    merge("weighted-sum", paths, str(out), params={"alpha": 0.3}, compute_dtype="float64")
    got, wa, wb = _weights(str(out)), _weights(paths[0]), _weights(paths[1])
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(got[key], torch.lerp(wa[key].double(), wb[key].double(), 0.3).float())
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["ckptkit.merge_recipe"])
    assert recipe["compute_dtype"] == "float64" and recipe["ckptkit"] == __version__


def test_ties_of_one_fine_tune_and_dare_ties(models, tmp_path):
    paths = [models[("sd1", i)] for i in range(3)]
    inputs = [_weights(p) for p in paths]
    keys = [k for k in inputs[0] if inputs[0][k].is_floating_point()
            and 2 < inputs[0][k].numel() < 3000][:20]
    ties2 = tmp_path / "ties2.safetensors"
    merge("ties", paths[:2], str(ties2), params={"alpha": 0.8, "density": 0.4})
    got = _weights(str(ties2))
    for key in keys:
        want = _ref_ties(inputs[0][key].double(), [inputs[1][key].double()], 0.8, 0.4)
        assert torch.allclose(got[key], want.float(), atol=1e-6), key
    # No drop: DARE-TIES is TIES without trimming.
    no_drop = tmp_path / "dt0.safetensors"
    merge("dare-ties", paths, str(no_drop), params={"alpha": 0.7, "drop": 0.0})
    got = _weights(str(no_drop))
    for key in keys:
        want = _ref_ties(inputs[0][key].double(), [m[key].double() for m in inputs[1:]], 0.7,
                         1.0)
        assert torch.allclose(got[key], want.float(), atol=1e-6), key
    # One fine-tune: the sign election has nothing to overrule, so DARE-TIES is DARE.
    linear, elected = tmp_path / "d.safetensors", tmp_path / "dt.safetensors"
    merge("dare", paths[:2], str(linear), params={"drop": 0.5, "seed": 7})
    merge("dare-ties", paths[:2], str(elected), params={"drop": 0.5, "seed": 7})
    d, dt = _weights(str(linear)), _weights(str(elected))
    assert all(torch.equal(d[k], dt[k]) for k in d)
    assert not torch.equal(d[keys[0]], inputs[0][keys[0]])
