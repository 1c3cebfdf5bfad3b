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
from lightning_ncnnqat.qat.plan import get_plan

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


class _Conv1dText(nn.Module):
    """ids [N, T] (0 = padding) -> Embedding(padding_idx=0) -> [N, E, T] -> Conv1d stack -> max -> Linear."""

    def __init__(self, depthwise: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16, padding_idx=0)
        if depthwise:
            convs = [nn.Conv1d(16, 16, 3, padding=1, groups=16), nn.Conv1d(16, 24, 1), nn.ReLU()]
        else:
            convs = [nn.Conv1d(16, 24, 3, padding=1, bias=False), nn.BatchNorm1d(24), nn.ReLU()]
        self.convs = nn.Sequential(*convs)
        self.fc = nn.Linear(24, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(self.emb(ids).transpose(1, 2)).amax(2))


def _padded_ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, 12), generator=g)
    ids[torch.arange(12)[None] >= torch.randint(4, 13, (n,), generator=g)[:, None]] = 0
    return ids


def _ncnn_out(param_dir, ids: torch.Tensor, as_int32: bool) -> torch.Tensor:  # noqa: ANN001
    import ncnn
    import numpy as np

    net = ncnn.Net()
    assert net.load_param(str(param_dir / "model.int8.param")) == 0
    assert net.load_model(str(param_dir / "model.int8.bin")) == 0
    outs = []
    for row in ids.numpy():
        arr = row.astype(np.int32).view(np.float32) if as_int32 else row.astype(np.float32)
        ex = net.create_extractor()
        ex.input("in0", ncnn.Mat(np.ascontiguousarray(arr)))
        outs.append(torch.from_numpy(np.array(ex.extract("out0")[1]).copy()).reshape(-1))
    return torch.stack(outs)


@pytest.mark.parametrize("depthwise", [False, True])
def test_conv1d_text_model_keeps_conv1d_float_with_parity(depthwise: bool, tmp_path) -> None:  # noqa: ANN001
    """pnnx writes Conv1d as ncnn Convolution1D / ConvolutionDepthWise1D, which have no int8 path: the
    plan keeps them float naming why, the Linear is int8, and plain ncnn fed the ids as its Embed
    reads them (int32 in the Mat, ncnn src/layer/embed.cpp) agrees with the QAT model. Fed as float32
    values (what a harness written for images does) every non-zero id reads as a clamped huge index."""
    torch.manual_seed(0)
    m = _Conv1dText(depthwise)
    plan = prepare_qat(m, _padded_ids(2, 0))
    assert set(plan.layers) == {"fc"}, plan.summary()
    conv_names = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv1d)]
    assert conv_names and all("Conv1d has no int8 kernel" in plan.float_layers[n] for n in conv_names)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    m.train()
    for s in range(3):
        loss = F.cross_entropy(m(_padded_ids(16, s)), torch.arange(16) % 5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    held = _padded_ids(24, 7)
    rep = export(m, tmp_path, held[:1], held, targets=["x86"], verbose=False, timing_runs=0)
    assert rep.ok, rep.summary()
    param = (tmp_path / "model.int8.param").read_text()
    conv1d_lines = [ln for ln in param.splitlines() if ln.split(" ", 1)[0].endswith("1D")]
    assert conv1d_lines and not any(" 8=" in ln for ln in conv1d_lines)  # float: no int8_scale_term
    assert " 8=2" in param.split("InnerProduct", 1)[1].splitlines()[0]
    m.eval()
    with torch.no_grad():
        ref = m(held)
    got = _ncnn_out(tmp_path, held, as_int32=True)
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.999
    wrong = _ncnn_out(tmp_path, held, as_int32=False)
    assert F.cosine_similarity(wrong.flatten(), ref.flatten(), dim=0) < 0.99
