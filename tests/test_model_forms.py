"""Model forms prepare_qat cannot prepare are refused in one line naming the fix (issue 19, item 6);
a float64 batch into a float32 model is cast, not refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import prepare_qat
from lightning_ncnnqat.errors import UnsupportedModelError
from lightning_ncnnqat.export import export
from lightning_ncnnqat.plan import get_plan

torch.set_num_threads(1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


X = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _refused(model, example, match: str) -> UnsupportedModelError:  # noqa: ANN001
    with pytest.raises(UnsupportedModelError, match=match) as info:
        prepare_qat(model, example)
    assert "\n" not in str(info.value)  # one line
    assert info.value.argument == "model"
    return info.value


@pytest.mark.parametrize("how", ["script", "trace"])
def test_script_module_refused_naming_the_fix(how: str) -> None:
    scripted = torch.jit.script(_net()) if how == "script" else torch.jit.trace(_net(), X[:2])
    _refused(scripted, X[:2], r"prepare_qat: `model` is a torch.jit.ScriptModule .* pass the nn.Module it was")


def test_float64_model_refused_naming_the_fix_and_left_unchanged() -> None:
    m = _net().double()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    _refused(m, X[:2].double(), r"float64 weights \('0.weight'\).*call model.float\(\) first")
    assert get_plan(m) is None and type(m[0]) is nn.Conv2d
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_torch_ao_prepared_and_meta_and_non_module_refused() -> None:
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat as ao_prepare_qat

    ao = _net().train()
    ao.qconfig = get_default_qat_qconfig("fbgemm")
    ao_prepare_qat(ao, inplace=True)
    _refused(ao, X[:2], r"already prepared by torch.ao.quantization .* pass the float model")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 2))
    _refused(meta, X[:2], r"meta device .* materialize them first")
    _refused(lambda x: x, X[:2], r"`model` must be a torch.nn.Module, got function")


def test_float64_batches_into_a_float32_model_work(tmp_path) -> None:  # noqa: ANN001
    """numpy-born float64 examples and held batches: cast to the model's float32 for tracing,
    parity and conversion."""
    m = _net()
    x64 = X.double()
    plan = prepare_qat(m, x64[:2])
    assert set(plan.layers) == {"0", "4"}
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    m.train()
    for _ in range(3):
        loss = F.cross_entropy(m(X), torch.arange(8) % 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rep = export(m, tmp_path, x64[:1], x64, targets=["x86"], verbose=False, timing_runs=0)
    assert rep.ok, rep.summary()
    assert rep.int8_vs_qat.cosine > 0.999 and rep.io["inputs"][0]["dtype"] == "float32"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_prepared_directly_exports_in_float32(dtype: torch.dtype, tmp_path) -> None:  # noqa: ANN001
    """prepare_qat accepts a float16/bfloat16 model (the fake-quant ops take them); export() runs
    on a float32 copy, as the callback does under precision='*-true', and leaves the model's dtype."""
    m = _net().to(dtype)
    x = X.to(dtype)
    prepare_qat(m, x[:2])
    m.train()
    loss = F.cross_entropy(m(x).float(), torch.arange(8) % 4)
    loss.backward()
    rep = export(m, tmp_path, x[:1], x, targets=["x86"], verbose=False, timing_runs=0)
    assert rep.ok, rep.summary()
    assert rep.int8_vs_qat.cosine > 0.999
    assert m[0].weight.dtype == dtype and get_plan(m) is not None
