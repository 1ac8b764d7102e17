"""Kernel choice for a model's CPU projections (dspark_ops.linear_plan): forced, measured, cached, routed."""
import json

import pytest
import torch
import torch.nn.functional as F

from dspark_ops import linear_plan
from dspark_ops.engine import SpeculativeEngine
from dspark_ops.models import LlamaConfig, LlamaModel
from randomness import fresh_seed


def small_model(seed: int) -> LlamaModel:
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    return LlamaModel(cfg, seed=seed).eval()


@pytest.fixture
def fresh_plans(monkeypatch, tmp_path):
    """auto mode, an empty plan cache on disk and in the process."""
    monkeypatch.setenv("DSPARK_LINEAR_IMPL", "auto")
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path))
    monkeypatch.setattr(linear_plan, "_PROCESS_PLANS", {})
    monkeypatch.setattr(linear_plan, "_machine_quiet", lambda: True)
    return tmp_path


def count_kernel_calls(monkeypatch) -> dict:
    """Counts the packed kernel's calls by row count (the hook looks the kernels up in linear_plan)."""
    calls = {"packed": [], "torch": []}
    for name in ("linear", "linear_silu_mul"):
        real = getattr(linear_plan, name)

        def spy(x, *a, real=real, **kw):
            calls["packed"].append(x.numel() // x.shape[-1])
            return real(x, *a, **kw)
        monkeypatch.setattr(linear_plan, name, spy)
    real_linear = F.linear

    def torch_spy(x, *a, **kw):
        calls["torch"].append(x.numel() // x.shape[-1])
        return real_linear(x, *a, **kw)
    monkeypatch.setattr(linear_plan.F, "linear", torch_spy)
    return calls


@pytest.mark.parametrize("impl", ["packed", "torch"])
def test_forced_impl_routes_every_small_call(monkeypatch, impl):
    monkeypatch.setenv("DSPARK_LINEAR_IMPL", impl)
    model = small_model(fresh_seed())
    plan = linear_plan.pack_linear_layers(model)
    assert plan.source == f"DSPARK_LINEAR_IMPL={impl}"
    calls = count_kernel_calls(monkeypatch)
    with torch.no_grad():
        model.linear_impl(torch.randn(3, 64), model.layers[0].self_attn.qkv_proj.weight, None)
        model.compute_logits(torch.randn(5, 64))
    other = "torch" if impl == "packed" else "packed"
    assert calls[impl] and not calls[other]


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("DSPARK_LINEAR_IMPL", "mkl")
    with pytest.raises(ValueError, match="DSPARK_LINEAR_IMPL"):
        linear_plan.pack_linear_layers(small_model(0))


def test_measured_choice_routes_by_row_count(monkeypatch, fresh_plans):
    """torch measured faster for one row only: 1-row calls go to F.linear, taller blocks to the packed
    kernel, and both give the projection's values."""
    def fake_times(calls, rounds=2):
        x_rows = calls["packed"].__defaults__[0].shape[0]
        return {"packed": 1.0, "torch": 0.5 if x_rows == 1 else 2.0}
    monkeypatch.setattr(linear_plan, "time_impls", fake_times)
    model = small_model(fresh_seed())
    plan = linear_plan.pack_linear_layers(model)
    assert plan.source == "measured"
    assert all(v == ("torch",) + ("packed",) * (len(linear_plan.ROW_BUCKETS) - 1) for v in plan.choices.values())
    calls = count_kernel_calls(monkeypatch)
    w = model.layers[0].mlp.down_proj.weight
    for rows in (1, 2, 7, 64):
        x = torch.randn(rows, w.shape[1])
        y = model.linear_impl(x, w, None)
        torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)
    assert calls == {"torch": [1], "packed": [2, 7, 64]}
    gu = model.layers[0].mlp.gate_up_proj.weight
    for rows in (1, 5):
        x = torch.randn(rows, 64)
        gate, up = (x @ gu.T).chunk(2, -1)
        torch.testing.assert_close(model.linear_impl.silu_mul(x, gu, None), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
    assert calls["packed"][-1] == 5 and calls["torch"][-1] == 1


def test_plan_is_cached_per_machine(monkeypatch, fresh_plans):
    monkeypatch.setattr(linear_plan, "time_impls", lambda calls, rounds=2: {"packed": 2.0, "torch": 1.0})
    first = linear_plan.pack_linear_layers(small_model(1))
    assert first.source == "measured" and {"torch"} == {i for v in first.choices.values() for i in v}
    saved = json.loads((fresh_plans / "linear_plan.json").read_text())
    assert list(saved) == [linear_plan.machine_key()]

    def must_not_measure(weights):
        raise AssertionError("a cached plan was measured again")
    monkeypatch.setattr(linear_plan, "measure", must_not_measure)
    monkeypatch.setattr(linear_plan, "_PROCESS_PLANS", {})   # a new process: the plan comes from disk
    second = linear_plan.pack_linear_layers(small_model(2))
    assert second.source == "cached" and second.choices == first.choices


def test_busy_machine_measures_but_does_not_cache(monkeypatch, fresh_plans):
    monkeypatch.setattr(linear_plan, "_machine_quiet", lambda: False)
    monkeypatch.setattr(linear_plan, "time_impls", lambda calls, rounds=2: {"packed": 1.0, "torch": 2.0})
    plan = linear_plan.pack_linear_layers(small_model(3))
    assert "busy" in plan.source
    assert not (fresh_plans / "linear_plan.json").exists()


def test_real_measurement_gives_a_valid_plan(fresh_plans):
    model = small_model(fresh_seed())
    plan = linear_plan.pack_linear_layers(model)
    assert plan.choices and all(len(v) == len(linear_plan.ROW_BUCKETS) and set(v) <= set(linear_plan.IMPLS)
                                for v in plan.choices.values())


def test_engine_reports_its_plans(monkeypatch):
    monkeypatch.setenv("DSPARK_LINEAR_IMPL", "torch")
    engine = SpeculativeEngine(small_model(4), None, max_batch=2, max_tokens=64)
    plans = engine.linear_plans
    assert plans["target"]["source"] == "DSPARK_LINEAR_IMPL=torch"
    assert {"torch"} == {k for c in plans["target"]["choices"].values() for k in c.values()}
    out = engine.generate([[1, 2, 3]], max_new_tokens=4)
    assert len(out[0]) == 4


def test_cpu_bfloat16_target_is_bf16_weights_computed_in_fp32(tmp_path, monkeypatch):
    from dspark_ops.generate import load_target

    monkeypatch.setenv("DSPARK_LINEAR_IMPL", "packed")
    small_model(fresh_seed()).save_pretrained(tmp_path)
    model = load_target(tmp_path, torch.bfloat16, "cpu")
    assert model.dtype == torch.float32
    w = model.layers[0].mlp.down_proj.weight
    assert torch.equal(w, w.to(torch.bfloat16).float())
    engine = SpeculativeEngine(model, None, max_batch=1, max_tokens=64)
    assert all(key.endswith("bfloat16") for key in engine.linear_plans["target"]["choices"])
